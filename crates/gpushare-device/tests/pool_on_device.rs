//! The pool on a device: real bytes survive eviction to pinned host memory and restore at
//! a new address, on both backends; the linear fallback serves devices without VMM.

use gpushare_device::{
    CudaDevice, Device, DevicePtr, DeviceRange, EventFlags, LinearSource, PinnedBuffer, SimConfig,
    SimDevice, Stream, VmmSource,
};
use gpushare_pool::{
    ChunkSource, EvictError, EvictableKey, Eviction, Evictor, OwnerSpec, Pool, PoolConfig,
    RestoreInfo, StreamId, Tier, VictimInfo,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// Offloads evicted blocks to pinned host memory and copies them back on restore.
struct Offloader {
    dev: Arc<dyn Device>,
    stream: Stream,
    store: Mutex<HashMap<EvictableKey, PinnedBuffer>>,
}

impl Evictor for Offloader {
    fn evict(&self, v: &VictimInfo) -> Result<Eviction, EvictError> {
        let e = |e: gpushare_device::DeviceError| EvictError(e.to_string());
        let buf = self.dev.alloc_pinned(v.size).map_err(e)?;
        let src = DeviceRange::new(DevicePtr(v.addr), v.size);
        self.dev
            .copy_dtoh(buf.full(), src, &self.stream)
            .map_err(e)?;
        // The pool waits for the copy without its lock.
        let done = self.dev.create_event(EventFlags::default()).map_err(e)?;
        self.dev.record_event(&done, &self.stream).map_err(e)?;
        self.store.lock().insert(v.id, buf);
        let dev = self.dev.clone();
        Ok(Eviction::in_flight(move || {
            dev.synchronize_event(&done).map_err(e)
        }))
    }
    fn restore(&self, r: &RestoreInfo) -> Result<(), EvictError> {
        let e = |e: gpushare_device::DeviceError| EvictError(e.to_string());
        let buf = self
            .store
            .lock()
            .remove(&r.id)
            .ok_or_else(|| EvictError("nothing was offloaded for this block".into()))?;
        let dst = DeviceRange::new(DevicePtr(r.addr), r.size);
        self.dev
            .copy_htod(dst, buf.full(), &self.stream)
            .map_err(e)?;
        self.dev.synchronize_stream(&self.stream).map_err(e)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

fn evict_then_restore_returns_the_same_bytes(dev: Arc<dyn Device>) {
    let src = VmmSource::new(dev.clone(), 256 * MIB).unwrap();
    let pool = Pool::new(src, PoolConfig::default().capacity(8 * MIB)).unwrap();
    let stream = dev.create_stream(0).unwrap();
    let off = Arc::new(Offloader {
        dev: dev.clone(),
        stream: dev.create_stream(0).unwrap(),
        store: Mutex::new(HashMap::new()),
    });
    pool.set_evictor(off.clone());
    let vision = pool.add_owner(OwnerSpec::new("vision", 8 * MIB)).unwrap();
    let llm = pool
        .add_owner(OwnerSpec::new("llm", 8 * MIB).tier(Tier::Guaranteed))
        .unwrap();

    let n = 3 * MIB + 4096;
    let (id, pin) = pool.alloc_evictable(vision, n, 0, StreamId(1)).unwrap();
    let data = pattern(n as usize, 0x5a);
    dev.write_sync(DeviceRange::new(DevicePtr(pin.addr), n), &data, &stream)
        .unwrap();
    pool.unpin(&id).unwrap();

    // The Guaranteed owner needs room: the BestEffort block is offloaded.
    let big = pool.alloc(llm, 6 * MIB, StreamId(2)).unwrap();
    assert!(!pool.is_resident(&id).unwrap());
    assert_eq!(off.store.lock().len(), 1);
    // Scribble over the memory the victim had, as its new user would.
    dev.memset(
        DeviceRange::new(DevicePtr(pool.addr(&big)), 6 * MIB),
        0xEE,
        &stream,
    )
    .unwrap();
    dev.synchronize_stream(&stream).unwrap();
    pool.free(big).unwrap();

    // Pinning restores it, possibly elsewhere, with the same bytes.
    let pin2 = pool.pin(&id, StreamId(1)).unwrap();
    assert!(pin2.restored);
    let mut back = vec![0u8; n as usize];
    dev.read_sync(
        &mut back,
        DeviceRange::new(DevicePtr(pin2.addr), n),
        &stream,
    )
    .unwrap();
    assert!(back == data, "restored bytes differ");
    let s = pool.stats();
    assert_eq!((s.evictions, s.restores), (1, 1));
    pool.unpin(&id).unwrap();
    pool.free_evictable(id).unwrap();
    let mapped = pool.stats().mapped_bytes;
    assert!(mapped <= 8 * MIB);
    assert_eq!(pool.trim().unwrap(), mapped);
    assert_eq!(pool.stats().mapped_bytes, 0);
}

fn blocks_hold_their_own_bytes<S: ChunkSource>(dev: &Arc<dyn Device>, source: S) {
    let stream = dev.create_stream(0).unwrap();
    let pool = Pool::new(source, PoolConfig::default()).unwrap();
    let o = pool.add_owner(OwnerSpec::new("o", 128 * MIB)).unwrap();
    let mut blocks = vec![];
    for i in 0..24u64 {
        let size = 1000 + i * 77_777;
        let b = pool.alloc(o, size, StreamId(0)).unwrap();
        let d = pattern(size as usize, i as u8);
        dev.write_sync(
            DeviceRange::new(DevicePtr(pool.addr(&b)), size),
            &d,
            &stream,
        )
        .unwrap();
        blocks.push((b, d));
    }
    for (b, d) in blocks {
        let mut back = vec![0u8; d.len()];
        let r = DeviceRange::new(DevicePtr(pool.addr(&b)), d.len() as u64);
        dev.read_sync(&mut back, r, &stream).unwrap();
        assert!(back == d);
        pool.free(b).unwrap();
    }
    assert!(pool.trim().unwrap() > 0);
}

#[test]
fn sim_evict_then_restore_returns_the_same_bytes() {
    let dev = Arc::new(SimDevice::new());
    evict_then_restore_returns_the_same_bytes(dev.clone());
    let live = dev.live();
    assert_eq!(
        (live.chunks, live.mappings, live.pinned),
        (0, 0, 0),
        "{live:?}"
    );
}

#[test]
fn sim_blocks_hold_their_own_bytes() {
    let dev: Arc<dyn Device> = Arc::new(SimDevice::new());
    blocks_hold_their_own_bytes(&dev, VmmSource::new(dev.clone(), 256 * MIB).unwrap());
}

#[test]
fn sim_linear_fallback_without_vmm() {
    let sim = Arc::new(SimDevice::with_config(SimConfig::default().vmm(false)).unwrap());
    let dev: Arc<dyn Device> = sim.clone();
    assert!(VmmSource::new(dev.clone(), 64 * MIB).is_err());
    blocks_hold_their_own_bytes(&dev, LinearSource::new(dev.clone(), 256 * MIB));
    assert_eq!(sim.live().mappings, 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_evict_then_restore_returns_the_same_bytes() {
    evict_then_restore_returns_the_same_bytes(Arc::new(CudaDevice::new(0).expect("a CUDA GPU")));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_blocks_hold_their_own_bytes() {
    let dev: Arc<dyn Device> = Arc::new(CudaDevice::new(0).expect("a CUDA GPU"));
    blocks_hold_their_own_bytes(&dev, VmmSource::new(dev.clone(), 256 * MIB).unwrap());
    blocks_hold_their_own_bytes(&dev, LinearSource::new(dev.clone(), 256 * MIB));
}
