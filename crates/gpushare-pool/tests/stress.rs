//! Many threads allocating and freeing at once, across owners and streams, with quotas.

use gpushare_pool::{HostSource, OwnerSpec, Pool, PoolConfig, PoolError, StreamId};
use std::sync::Arc;

#[test]
fn many_threads_keep_accounting_exact() {
    let pool = Arc::new(
        Pool::new(
            HostSource::new(2 << 20, 1 << 32),
            PoolConfig::default().capacity(1 << 30).shards(8),
        )
        .unwrap(),
    );
    let owners: Vec<_> = (0..4)
        .map(|i| {
            pool.add_owner(OwnerSpec::new(format!("o{i}"), 96 << 20))
                .unwrap()
        })
        .collect();
    let threads = 8;
    std::thread::scope(|sc| {
        for t in 0..threads {
            let pool = pool.clone();
            let owners = owners.clone();
            sc.spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut live = Vec::new();
                for _ in 0..20_000 {
                    let r = next();
                    if live.len() < 64 && r % 3 != 0 {
                        let owner = owners[(r >> 8) as usize % owners.len()];
                        let size = 1 + (r >> 16) % (1 << ((r >> 40) % 21));
                        match pool.alloc(owner, size, StreamId(t as u64 % 3)) {
                            Ok(b) => live.push(b),
                            Err(
                                PoolError::QuotaExceeded { .. } | PoolError::OutOfMemory { .. },
                            ) => {}
                            Err(e) => panic!("{e}"),
                        }
                    } else if !live.is_empty() {
                        let i = (r >> 20) as usize % live.len();
                        pool.free(live.swap_remove(i)).unwrap();
                    }
                    // Now and then a thread returns every cache to the central allocator
                    // and unmaps what it can, racing the others' cached frees and probes.
                    if r % 997 == 0 {
                        pool.trim().unwrap();
                    }
                }
                for b in live {
                    pool.free(b).unwrap();
                }
            });
        }
    });
    let s = pool.stats();
    assert_eq!(s.live_bytes, 0);
    assert_eq!(s.allocs, s.frees);
    for o in &s.owners {
        assert!(o.peak_in_use_bytes <= o.limit);
        assert_eq!(o.live_bytes, 0);
    }
    assert_eq!(
        s.mapped_bytes,
        s.free_bytes + s.pending_bytes + s.in_use_bytes
    );
    pool.trim().unwrap();
    assert_eq!(pool.stats().mapped_bytes, 0);
}
