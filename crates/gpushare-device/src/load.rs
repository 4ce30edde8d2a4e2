//! A synthetic load for isolation and overlap measurements: every block of a launch spins
//! for a given number of GPU clock cycles.
//!
//! On CUDA it is a kernel compiled once with NVRTC and loaded into each context it is
//! launched in (streams of an SM partition live in their own context). On the simulated
//! device it busy-waits the equivalent time at a nominal [`SIM_CLOCK_HZ`] on the stream's
//! worker, in stream order; the simulation does not model SM contention.

use crate::error::{DeviceError, DriverCall, Result};
use crate::handles::StreamInner;
use crate::{Device, Stream};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The clock the simulated device pretends to run at, to turn cycles into time.
pub const SIM_CLOCK_HZ: u64 = 1_500_000_000;

const SRC: &str = r#"
extern "C" __global__ void gpushare_spin(unsigned long long cycles) {
    long long start = clock64();
    while ((unsigned long long)(clock64() - start) < cycles) { }
}
"#;

/// A spin kernel ready to launch on any stream of one device.
pub struct SpinLoad {
    dev: Arc<dyn Device>,
    cuda: Option<CudaSpin>,
}

struct CudaSpin {
    ptx: cudarc::nvrtc::Ptx,
    /// One loaded function per context.
    funcs: Mutex<Vec<Loaded>>,
}

/// The function loaded in one context, keyed by the raw context handle. In a partition's
/// context it holds the partition, and goes with it current: cudarc's module makes its
/// context current to unload, and a green context may be current on one thread at a time.
/// Without the hold, the partition would find the module alive at its end, and be left to
/// the process.
struct Loaded {
    key: usize,
    f: Option<CudaFunction>,
    green: Option<Arc<crate::cuda::GreenCtx>>,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(g) = &self.green {
            let mut f = self.f.take();
            let r = g.with_current(|| {
                drop(f.take());
                Ok(())
            });
            if let (Err(e), Some(f)) = (r, f) {
                // The partition's context could not be made current: unloading without it
                // would make it current unguarded, so the module is left to the process.
                tracing::warn!(error = %e, "a partition's spin kernel is left loaded");
                std::mem::forget(f);
            }
        }
    }
}

impl std::fmt::Debug for SpinLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpinLoad")
            .field("backend", &self.dev.info().backend)
            .finish()
    }
}

impl SpinLoad {
    /// Prepare the load for `dev`. On CUDA this compiles the kernel with NVRTC, which must
    /// be installed (it ships with the CUDA toolkit).
    pub fn new(dev: Arc<dyn Device>) -> Result<Self> {
        let cuda = match dev.as_cuda() {
            None => None,
            Some(_) => {
                // SAFETY: only tries to dlopen the NVRTC library; no NVRTC call is made.
                if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                    return Err(DeviceError::Unsupported {
                        what: "the spin kernel",
                        reason: "NVRTC (libnvrtc) was not found; install the CUDA toolkit".into(),
                    });
                }
                let ptx =
                    cudarc::nvrtc::compile_ptx(SRC).map_err(|e| DeviceError::Unsupported {
                        what: "the spin kernel",
                        reason: format!("NVRTC could not compile it: {e}"),
                    })?;
                Some(CudaSpin {
                    ptx,
                    funcs: Mutex::new(Vec::new()),
                })
            }
        };
        Ok(SpinLoad { dev, cuda })
    }

    /// Launch `blocks` blocks of `threads` threads that each spin for `cycles` cycles, on
    /// `stream`.
    pub fn launch(&self, stream: &Stream, blocks: u32, threads: u32, cycles: u64) -> Result<()> {
        if blocks == 0 || threads == 0 {
            return Err(DeviceError::ZeroSize {
                what: "spin launch (blocks and threads)",
            });
        }
        if threads > 1024 {
            return Err(DeviceError::OutOfRange {
                what: "threads per block",
                offset: 0,
                end: u64::from(threads),
                limit: 1024,
            });
        }
        crate::check_owner(self.dev.id(), "stream", stream.device)?;
        match (&self.cuda, &stream.inner) {
            // A partition's module and launch go through cudarc, which makes the stream's
            // green context current: one thread at a time, and the primary after.
            (Some(c), StreamInner::Cuda(s, green)) => {
                crate::cuda::in_stream_context(green.as_deref(), || {
                    let key = s.context().cu_ctx() as usize;
                    let f = {
                        let mut funcs = c.funcs.lock();
                        match funcs
                            .iter()
                            .find(|l| l.key == key)
                            .and_then(|l| l.f.clone())
                        {
                            Some(f) => f,
                            None => {
                                let m = s
                                    .context()
                                    .load_module(c.ptx.clone())
                                    .call("cuModuleLoadData")?;
                                let f = m
                                    .load_function("gpushare_spin")
                                    .call("cuModuleGetFunction")?;
                                funcs.push(Loaded {
                                    key,
                                    f: Some(f.clone()),
                                    green: green.as_deref().map(|g| g.green().clone()),
                                });
                                f
                            }
                        }
                    };
                    let cfg = LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut b = s.launch_builder(&f);
                    b.arg(&cycles);
                    // SAFETY: the kernel takes one u64 by value, which is what is pushed, and
                    // touches no memory.
                    unsafe { b.launch(cfg) }.call("cuLaunchKernel")?;
                    Ok(())
                })
            }
            (None, StreamInner::Sim(_)) => {
                let d = Duration::from_secs_f64(cycles as f64 / SIM_CLOCK_HZ as f64);
                self.dev.host_callback(
                    stream,
                    Box::new(move || {
                        let t = Instant::now();
                        while t.elapsed() < d {
                            std::hint::spin_loop();
                        }
                    }),
                )
            }
            _ => Err(DeviceError::Unsupported {
                what: "spin launch",
                reason: "the stream is of another backend".into(),
            }),
        }
    }
}
