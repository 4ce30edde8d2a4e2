//! gpushare-qos: QoS tiers, admission and partitions, as pure logic without CUDA. It has no
//! items yet.
