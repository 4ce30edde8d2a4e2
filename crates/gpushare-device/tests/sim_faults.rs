//! Fault injection and leak checks on the simulated device.

use gpushare_device::sim::LiveResources;
use gpushare_device::{Device, DeviceError, EventFlags, FaultOp, SimConfig, SimDevice};
use std::sync::Arc;

/// Hold `stream` with a host callback until the returned sender sends (or is dropped).
fn hold(dev: &dyn Device, stream: &gpushare_device::Stream) -> std::sync::mpsc::Sender<()> {
    let (open, gate) = std::sync::mpsc::channel::<()>();
    dev.host_callback(
        stream,
        Box::new(move || {
            let _ = gate.recv();
        }),
    )
    .unwrap();
    open
}

fn injected(r: Result<impl std::fmt::Debug, DeviceError>, op: FaultOp, nth: u64) {
    match r {
        Err(DeviceError::InjectedFault { op: o, nth: n }) => {
            assert_eq!((o, n), (op, nth));
        }
        other => panic!("expected an injected {op} fault, got {other:?}"),
    }
}

#[test]
fn each_injected_failure_is_an_error_and_leaks_nothing() {
    let dev = SimDevice::new();
    let g = dev.info().granularity;
    let s = dev.create_stream(0).unwrap();
    let va = dev.reserve_va(4 * g).unwrap();
    let chunk = dev.create_chunk(g).unwrap();
    let m = dev.map_chunk(&va, 0, &chunk).unwrap();
    let host = dev.alloc_pinned(4096).unwrap();
    let ev = dev.create_event(EventFlags::default()).unwrap();
    dev.synchronize_stream(&s).unwrap();
    let base = dev.live();

    dev.fail_nth(FaultOp::ChunkCreate, 1);
    injected(dev.create_chunk(g), FaultOp::ChunkCreate, 1);
    assert_eq!(dev.live(), base);

    let c2 = dev.create_chunk(g).unwrap();
    let with_c2 = dev.live();
    dev.fail_nth(FaultOp::Map, 1);
    injected(dev.map_chunk(&va, g, &c2), FaultOp::Map, 1);
    assert_eq!(dev.live(), with_c2, "a failed map leaves no mapping");
    let m2 = dev.map_chunk(&va, g, &c2).unwrap();
    drop((m2, c2));
    assert_eq!(dev.live(), base);

    let r = m.range().slice(0, 4096).unwrap();
    dev.fail_nth(FaultOp::Copy, 3);
    dev.copy_htod(r, host.full(), &s).unwrap();
    dev.copy_dtoh(host.full(), r, &s).unwrap();
    injected(dev.copy_dtod(r, r, &s), FaultOp::Copy, 3);
    dev.memset(r, 1, &s).unwrap();

    dev.fail_nth(FaultOp::StreamOp, 1);
    injected(dev.record_event(&ev, &s), FaultOp::StreamOp, 1);
    assert!(
        dev.query_event(&ev).unwrap(),
        "a failed record leaves the event as it was"
    );
    dev.fail_nth(FaultOp::StreamOp, 1);
    injected(dev.create_stream(0), FaultOp::StreamOp, 1);

    dev.fail_nth(FaultOp::PinnedAlloc, 1);
    injected(dev.alloc_pinned(64), FaultOp::PinnedAlloc, 1);

    // A failed copy does not leave the pinned buffer marked busy: reads still return.
    dev.fail_nth(FaultOp::Copy, 1);
    injected(dev.copy_dtoh(host.full(), r, &s), FaultOp::Copy, 1);
    let mut out = [0u8; 16];
    host.read(0, &mut out).unwrap();

    dev.synchronize_stream(&s).unwrap();
    assert_eq!(dev.live(), base);
    drop((m, chunk, va, host, ev, s));
    assert!(dev.live().is_empty(), "{:?}", dev.live());
}

#[test]
fn reported_oom_and_capacity_are_typed() {
    let g = 2 << 20;
    let dev = SimDevice::with_config(SimConfig::default().total_memory(3 * g)).unwrap();
    let a = dev.create_chunk(2 * g).unwrap();
    match dev.create_chunk(2 * g) {
        Err(DeviceError::OutOfMemory { requested, free }) => {
            assert_eq!((requested, free), (2 * g, g));
        }
        other => panic!("{other:?}"),
    }
    dev.report_oom(true);
    assert!(matches!(
        dev.create_chunk(g),
        Err(DeviceError::OutOfMemory { .. })
    ));
    assert!(matches!(
        dev.alloc_linear(g),
        Err(DeviceError::OutOfMemory { .. })
    ));
    dev.clear_faults();
    let b = dev.create_chunk(g).unwrap();
    assert_eq!(dev.mem_info().unwrap().free, 0);
    drop((a, b));
    assert_eq!(dev.mem_info().unwrap().free, 3 * g);
    assert_eq!(dev.live(), LiveResources::default());
}

#[test]
fn host_kernels_see_device_memory_and_break_the_stream_on_error() {
    let dev = SimDevice::new();
    let g = dev.info().granularity;
    let a = dev.alloc_linear(g).unwrap();
    let r = a.range().slice(0, 8).unwrap();
    let s = dev.create_stream(0).unwrap();
    dev.write_sync(r, &[1, 2, 3, 4, 5, 6, 7, 8], &s).unwrap();
    dev.launch_host(&s, move |mem| {
        let mut b = [0u8; 8];
        mem.read(r, &mut b)?;
        b.iter_mut().for_each(|x| *x *= 10);
        mem.write(r, &b)
    })
    .unwrap();
    let mut out = [0u8; 8];
    dev.read_sync(&mut out, r, &s).unwrap();
    assert_eq!(out, [10, 20, 30, 40, 50, 60, 70, 80]);
    let mut peek = [0u8; 8];
    dev.peek(r, &mut peek).unwrap();
    assert_eq!(peek, out);

    // A kernel touching unmapped memory faults the stream, as on a GPU.
    let bad = gpushare_device::DeviceRange::new(gpushare_device::DevicePtr(8), 8);
    dev.launch_host(&s, move |mem| mem.write(bad, &[0; 8]))
        .unwrap();
    assert!(matches!(
        dev.synchronize_stream(&s),
        Err(DeviceError::StreamBroken(_))
    ));
    assert!(matches!(
        dev.memset(r, 0, &s),
        Err(DeviceError::StreamBroken(_))
    ));
    // Other streams are unaffected.
    let s2 = dev.create_stream(0).unwrap();
    dev.memset(r, 0, &s2).unwrap();
    dev.synchronize_stream(&s2).unwrap();

    // A panicking host callback breaks its stream too, but never the process.
    let s3 = dev.create_stream(0).unwrap();
    dev.host_callback(&s3, Box::new(|| panic!("boom"))).unwrap();
    match dev.synchronize_stream(&s3) {
        Err(DeviceError::StreamBroken(msg)) => assert!(msg.contains("boom")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn work_queued_behind_a_fault_does_not_run_and_the_faults_stay_with_their_stream() {
    let dev = SimDevice::new();
    let g = dev.info().granularity;
    let a = dev.alloc_linear(g).unwrap();
    let r = a.range().slice(0, 8).unwrap();
    let s = dev.create_stream(0).unwrap();
    let mut pinned = dev.alloc_pinned(8).unwrap();
    pinned.write(0, &[5; 8]).unwrap();
    // Everything below is queued before the stream runs any of it, behind a kernel that
    // will fault.
    let open = hold(&dev, &s);
    let bad = gpushare_device::DeviceRange::new(gpushare_device::DevicePtr(8), 8);
    dev.launch_host(&s, move |mem| mem.write(bad, &[0; 8]))
        .unwrap();
    dev.memset(r, 7, &s).unwrap();
    dev.copy_htod(r, pinned.slice(0, 8).unwrap(), &s).unwrap();
    let e = dev.create_event(EventFlags::default()).unwrap();
    dev.record_event(&e, &s).unwrap();
    let waiter = dev.create_stream(0).unwrap();
    dev.wait_event(&waiter, &e).unwrap();
    let (ran, callback_ran) = std::sync::mpsc::channel::<()>();
    dev.host_callback(
        &s,
        Box::new(move || {
            let _ = ran.send(());
        }),
    )
    .unwrap();
    open.send(()).unwrap();

    assert!(matches!(
        dev.synchronize_stream(&s),
        Err(DeviceError::StreamBroken(_))
    ));
    let mut out = [1u8; 8];
    dev.peek(r, &mut out).unwrap();
    assert_eq!(out, [0; 8], "work queued behind the fault must not run");
    // A host callback queued behind the fault still runs (what it wakes finds the error);
    // its event completes, so that nothing waits for ever, but reports the fault to whoever
    // asks; a stream that waited on it carries on.
    callback_ran
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a host callback queued behind a fault runs");
    assert!(matches!(
        dev.synchronize_event(&e),
        Err(DeviceError::StreamBroken(_))
    ));
    assert!(matches!(
        dev.query_event(&e),
        Err(DeviceError::StreamBroken(_))
    ));
    dev.memset(r, 9, &waiter).unwrap();
    dev.synchronize_stream(&waiter).unwrap();
    dev.peek(r, &mut out).unwrap();
    assert_eq!(out, [9; 8]);
    // The skipped copy released its pinned buffer, which answers at once: with the fault,
    // as on CUDA, where a read waits for the buffer's last copy and meets the error.
    let mut host = [0u8; 8];
    assert!(matches!(
        pinned.read(0, &mut host),
        Err(DeviceError::StreamBroken(_))
    ));
    // A copy that runs makes it usable again.
    dev.copy_dtoh(pinned.slice(0, 8).unwrap(), r, &waiter)
        .unwrap();
    pinned.read(0, &mut host).unwrap();
    assert_eq!(host, [9; 8]);
}

#[test]
fn without_vmm_the_linear_fallback_serves() {
    let dev = SimDevice::with_config(SimConfig::default().vmm(false)).unwrap();
    assert!(!dev.info().vmm_supported);
    assert!(matches!(
        dev.reserve_va(2 << 20),
        Err(DeviceError::Unsupported { .. })
    ));
    assert!(matches!(
        dev.create_chunk(2 << 20),
        Err(DeviceError::Unsupported { .. })
    ));
    let a = dev.alloc_linear(2 << 20).unwrap();
    let b = dev.alloc_linear(2 << 20).unwrap();
    assert!(a.range().end() < b.range().ptr.0, "separate ranges");
}

#[test]
fn without_green_contexts_partitions_are_unsupported() {
    let dev = SimDevice::with_config(SimConfig::default().green_contexts(false)).unwrap();
    assert!(matches!(
        dev.split_sms(&[8]),
        Err(DeviceError::Unsupported { .. })
    ));
}

#[test]
fn bad_configs_are_rejected() {
    for c in [
        SimConfig::default().granularity(3 << 20),
        SimConfig::default().granularity(0),
        SimConfig::default().total_memory(0),
        SimConfig::default().sm_count(0),
    ] {
        assert!(matches!(
            SimDevice::with_config(c),
            Err(DeviceError::Config { .. })
        ));
    }
}

#[test]
fn streams_may_be_dropped_from_their_own_work() {
    let dev = SimDevice::new();
    let s = dev.create_stream(0).unwrap();
    let s2 = s.clone();
    dev.host_callback(&s, Box::new(move || drop(s2))).unwrap();
    drop(s);
    // The worker ends on its own; nothing hangs and the count returns to zero.
    for _ in 0..200 {
        if dev.live().streams == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("stream still live: {:?}", dev.live());
}

#[test]
fn addresses_are_never_reused() {
    let dev = SimDevice::new();
    let g = dev.info().granularity;
    let first = dev.reserve_va(g).unwrap().base();
    let second = dev.reserve_va(g).unwrap().base();
    assert!(second.0 >= first.0 + g);
}

#[test]
fn a_fault_planned_past_the_last_operation_is_accepted_and_never_fires() {
    let dev = SimDevice::new();
    let g = dev.info().granularity;
    dev.create_chunk(g).unwrap();
    // The count of chunk creations is already 1: adding u64::MAX overflowed.
    dev.fail_nth(FaultOp::ChunkCreate, u64::MAX);
    for _ in 0..3 {
        dev.create_chunk(g).unwrap();
    }
}

#[test]
fn a_simulated_device_that_runs_out_of_addresses_says_so() {
    // Addresses are never reused: 2^46-byte reservations, each dropped at once, use up
    // the 64-bit range after about 2^18 of them.
    let dev = SimDevice::new();
    let mut ran_out = None;
    for i in 0..(1u64 << 19) {
        match dev.reserve_va(1 << 46) {
            Ok(va) => drop(va),
            Err(e) => {
                ran_out = Some((i, e));
                break;
            }
        }
    }
    match ran_out {
        Some((i, DeviceError::Unsupported { .. })) => assert!(i > 1000, "ran out after {i}"),
        other => panic!("expected the address space to run out, got {other:?}"),
    }
}

/// Synchronous copies, queued behind other work, find the memory unmapped meanwhile as
/// the stream's other work does: the stream faults, and the copy's caller hears of it.
#[test]
fn a_synchronous_copy_that_runs_after_its_memory_was_unmapped_faults_its_stream() {
    let dev = Arc::new(SimDevice::new());
    let g = dev.info().granularity;
    for write in [true, false] {
        let va = dev.reserve_va(g).unwrap();
        let chunk = dev.create_chunk(g).unwrap();
        let m = dev.map_chunk(&va, 0, &chunk).unwrap();
        let r = m.range().slice(0, 8).unwrap();
        let s = dev.create_stream(0).unwrap();
        let open = hold(&*dev, &s);
        let copier = {
            let (dev, s) = (dev.clone(), s.clone());
            std::thread::spawn(move || {
                if write {
                    dev.write_sync(r, &[7; 8], &s)
                } else {
                    dev.read_sync(&mut [0; 8], r, &s)
                }
            })
        };
        // The copy is queued (or about to be) behind the held callback; the memory goes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(m);
        open.send(()).unwrap();
        // (Should the copy come after the unmap, on a slow machine, it is refused at once.)
        assert!(
            matches!(
                copier.join().unwrap(),
                Err(DeviceError::StreamBroken(_) | DeviceError::InvalidAddress { .. })
            ),
            "a {} of unmapped memory succeeded",
            if write { "write" } else { "read" }
        );
    }
}

#[test]
fn two_faults_asked_for_one_operation_fail_two() {
    let dev = SimDevice::new();
    dev.fail_nth(FaultOp::StreamOp, 1);
    dev.fail_nth(FaultOp::StreamOp, 1);
    assert!(dev.create_stream(0).is_err());
    assert!(dev.create_stream(0).is_err());
    assert!(dev.create_stream(0).is_ok());
}

#[test]
fn host_memory_the_host_cannot_give_is_out_of_memory() {
    let dev = SimDevice::new();
    for len in [1u64 << 62, 1 << 50] {
        assert!(matches!(
            dev.alloc_pinned(len),
            Err(DeviceError::OutOfMemory { .. })
        ));
    }
    let huge = SimDevice::with_config(SimConfig::default().total_memory(1 << 60)).unwrap();
    let before = huge.mem_info().unwrap().free;
    assert!(matches!(
        huge.create_chunk(1 << 50),
        Err(DeviceError::OutOfMemory { .. })
    ));
    assert_eq!(
        huge.mem_info().unwrap().free,
        before,
        "the failed chunk stayed charged"
    );
}

#[test]
fn a_device_call_from_a_host_callback_is_refused_as_on_cuda() {
    let dev = Arc::new(SimDevice::new());
    let s = dev.create_stream(0).unwrap();
    let e = dev.create_event(EventFlags::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (d, e2, s2) = (dev.clone(), e.clone(), s.clone());
    dev.host_callback(
        &s,
        Box::new(move || {
            let _ = tx.send((d.query_event(&e2), d.launch_host(&s2, |_| Ok(()))));
        }),
    )
    .unwrap();
    let (query, launch) = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(
        matches!(query, Err(DeviceError::Unsupported { .. })),
        "{query:?}"
    );
    assert!(
        matches!(launch, Err(DeviceError::Unsupported { .. })),
        "{launch:?}"
    );
    // The stream goes on, and so does a kernel's own device memory access, which is no
    // callback.
    let mem = dev.alloc_linear(dev.info().granularity).unwrap();
    let r = mem.range().slice(0, 8).unwrap();
    dev.launch_host(&s, move |m| m.write(r, &[3; 8])).unwrap();
    dev.synchronize_stream(&s).unwrap();
    assert!(dev.query_event(&e).unwrap());
    let mut out = [0u8; 8];
    dev.peek(r, &mut out).unwrap();
    assert_eq!(out, [3; 8]);
}
