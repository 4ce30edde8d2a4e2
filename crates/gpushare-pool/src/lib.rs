//! gpushare-pool: the device allocator, usable on its own. It compiles and tests without a
//! GPU. It has no items yet.
