//! Model-shaped GPU work over device memory: cuBLAS SGEMM for the transformer matmuls, and
//! NVRTC kernels for a fill, an FIR filter (the vocoder) and a 3×3 convolution (vision).
//!
//! On CUDA every call is a launch on the given stream and returns at once. On the simulated
//! device the same arithmetic runs on the stream's worker, in stream order, over the
//! simulated device memory. All matrices are f32, column-major.

use gpushare::device::cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use gpushare::device::cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use gpushare::device::cudarc::nvrtc::Ptx;
use gpushare::device::sim::SimMemory;
use gpushare::device::SpinLoad;
use gpushare::device::{Device, DevicePtr, DeviceRange, Stream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SRC: &str = r#"
extern "C" __global__ void gs_fill(float* p, unsigned long long n, float v) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}
extern "C" __global__ void gs_fir(const float* in, const float* taps, float* out,
                                  unsigned int n, unsigned int ntaps) {
    unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t + ntaps > n) return;
    float acc = 0.f;
    for (unsigned int k = 0; k < ntaps; ++k) acc += taps[k] * in[t + k];
    out[t] = acc;
}
extern "C" __global__ void gs_conv3x3(const float* img, const float* filt, float* out,
                                      unsigned int c_out, unsigned int h, unsigned int w) {
    unsigned int x = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int y = blockIdx.y;
    unsigned int c = blockIdx.z;
    if (x >= w || y >= h || c >= c_out) return;
    float acc = 0.f;
    if (x > 0 && y > 0 && x + 1 < w && y + 1 < h) {
        for (int dy = 0; dy < 3; ++dy)
            for (int dx = 0; dx < 3; ++dx)
                acc += filt[c * 9 + dy * 3 + dx] * img[(y + dy - 1) * w + (x + dx - 1)];
    }
    out[((unsigned long long)c * h + y) * w + x] = acc;
}
"#;

struct Funcs {
    fill: CudaFunction,
    fir: CudaFunction,
    conv: CudaFunction,
}

struct Cuda {
    ptx: Ptx,
    /// Kernels loaded per CUDA context (a partition's stream lives in its own context),
    /// with a stream of that context.
    funcs: Mutex<Vec<(usize, Arc<Funcs>, Stream)>>,
    /// One cuBLAS handle per stream, with the stream.
    blas: Mutex<Vec<(usize, Arc<CudaBlas>, Stream)>>,
    /// A spin kernel, for [`Kernels::delay`].
    spin: SpinLoad,
}

impl Drop for Cuda {
    /// cudarc makes a module's or a cuBLAS handle's context current to release it: a
    /// partition's goes inside `with_cuda_stream` of one of its streams, like its launches.
    fn drop(&mut self) {
        let blas = std::mem::take(self.blas.get_mut().unwrap_or_else(PoisonError::into_inner));
        let funcs = std::mem::take(self.funcs.get_mut().unwrap_or_else(PoisonError::into_inner));
        for (_, b, s) in blas {
            let _ = s.with_cuda_stream(|_| drop(b));
        }
        for (_, f, s) in funcs {
            let _ = s.with_cuda_stream(|_| drop(f));
        }
    }
}

/// The kernels, ready to launch on any stream of one device.
pub struct Kernels {
    dev: Arc<dyn Device>,
    cuda: Option<Cuda>,
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(m: &SimMemory<'_>, at: DevicePtr, n: usize) -> gpushare::device::Result<Vec<f32>> {
    let mut b = vec![0u8; n * 4];
    m.read(DeviceRange::new(at, b.len() as u64), &mut b)?;
    Ok(floats(&b))
}

fn write_f32(m: &SimMemory<'_>, at: DevicePtr, v: &[f32]) -> gpushare::device::Result<()> {
    m.write(DeviceRange::new(at, v.len() as u64 * 4), &bytes(v))
}

fn blocks(n: u64, threads: u32) -> u32 {
    n.div_ceil(u64::from(threads)) as u32
}

impl Kernels {
    /// Compile the kernels for `dev` (NVRTC on CUDA; nothing on the simulated device).
    pub fn new(dev: Arc<dyn Device>) -> Res<Self> {
        let cuda = match dev.as_cuda() {
            None => None,
            Some(_) => {
                // cudarc panics when a library it loads is missing: say so instead.
                // SAFETY: each call only tries to dlopen the library; no call into it is made.
                let (nvrtc, cublas) = unsafe {
                    (
                        gpushare::device::cudarc::nvrtc::sys::is_culib_present(),
                        gpushare::device::cudarc::cublas::sys::is_culib_present(),
                    )
                };
                if !(nvrtc && cublas) {
                    return Err("NVRTC (libnvrtc) and cuBLAS (libcublas) are needed on a GPU: install the CUDA toolkit, or run on the simulated device with GPUSHARE_DEVICE=sim".into());
                }
                Some(Cuda {
                    ptx: gpushare::device::cudarc::nvrtc::compile_ptx(SRC)?,
                    funcs: Mutex::new(Vec::new()),
                    blas: Mutex::new(Vec::new()),
                    spin: SpinLoad::new(dev.clone())?,
                })
            }
        };
        Ok(Kernels { dev, cuda })
    }

    /// Hold `s` up for about `d` before its next work: a spin kernel on CUDA, a sleeping
    /// host kernel on the simulated device. For checks that work queued behind it waits.
    pub fn delay(&self, s: &Stream, d: Duration) -> Res<()> {
        match &self.cuda {
            // No data-centre GPU clocks above 2 GHz: at least `d`.
            Some(c) => Ok(c.spin.launch(s, 1, 32, (d.as_secs_f64() * 2.0e9) as u64)?),
            None => self.host(s, move |_| {
                std::thread::sleep(d);
                Ok(())
            }),
        }
    }

    /// Run `f` on the cudarc stream of `s`, in the context cudarc needs current for it (a
    /// partition's green context, one thread at a time: see `Stream::with_cuda_stream`).
    fn on_cuda<R>(s: &Stream, f: impl FnOnce(&Arc<CudaStream>) -> Res<R>) -> Res<R> {
        s.with_cuda_stream(f)?
            .unwrap_or_else(|| Err("a CUDA stream is needed".into()))
    }

    fn funcs(&self, c: &Cuda, s: &Stream, cs: &Arc<CudaStream>) -> Res<Arc<Funcs>> {
        let key = cs.context().cu_ctx() as usize;
        let mut all = c.funcs.lock().map_err(|_| "kernel cache poisoned")?;
        if let Some((_, f, _)) = all.iter().find(|(k, _, _)| *k == key) {
            return Ok(f.clone());
        }
        let m = cs.context().load_module(c.ptx.clone())?;
        let f = Arc::new(Funcs {
            fill: m.load_function("gs_fill")?,
            fir: m.load_function("gs_fir")?,
            conv: m.load_function("gs_conv3x3")?,
        });
        all.push((key, f.clone(), s.clone()));
        Ok(f)
    }

    fn blas(&self, c: &Cuda, s: &Stream, cs: &Arc<CudaStream>) -> Res<Arc<CudaBlas>> {
        let key = cs.cu_stream() as usize;
        let mut all = c.blas.lock().map_err(|_| "cuBLAS cache poisoned")?;
        if let Some((_, b, _)) = all.iter().find(|(k, _, _)| *k == key) {
            return Ok(b.clone());
        }
        let b = Arc::new(CudaBlas::new(cs.clone())?);
        all.push((key, b.clone(), s.clone()));
        Ok(b)
    }

    /// `p[0..n] = v`.
    pub fn fill(&self, s: &Stream, p: DevicePtr, n: u64, v: f32) -> Res<()> {
        match &self.cuda {
            Some(c) => Self::on_cuda(s, |cs| {
                let f = self.funcs(c, s, cs)?;
                let mut b = cs.launch_builder(&f.fill);
                b.arg(&p.0).arg(&n).arg(&v);
                // SAFETY: `p` points to `n` floats of device memory that the caller's
                // session keeps pinned until this stream's work completes.
                unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }?;
                Ok(())
            }),
            None => self.host(s, move |m| write_f32(m, p, &vec![v; n as usize])),
        }
    }

    /// `C[m×n] = A[m×k] · B[k×n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        s: &Stream,
        m: usize,
        n: usize,
        k: usize,
        a: DevicePtr,
        b: DevicePtr,
        c: DevicePtr,
    ) -> Res<()> {
        match &self.cuda {
            Some(cu) => Self::on_cuda(s, |cs| {
                let h = self.blas(cu, s, cs)?;
                let (alpha, beta) = (1.0f32, 0.0f32);
                let (mi, ni, ki) = (m as i32, n as i32, k as i32);
                // SAFETY: A, B and C are device allocations of m·k, k·n and m·n floats that
                // the caller's session keeps pinned until this stream's work completes; the
                // handle is bound to this stream; alpha and beta outlive the call.
                unsafe {
                    blas::sgemm(
                        *h.handle(),
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        mi,
                        ni,
                        ki,
                        &alpha,
                        a.0 as *const f32,
                        mi,
                        b.0 as *const f32,
                        ki,
                        &beta,
                        c.0 as *mut f32,
                        mi,
                    )
                }?;
                Ok(())
            }),
            None => self.host(s, move |mem| {
                let av = read_f32(mem, a, m * k)?;
                let bv = read_f32(mem, b, k * n)?;
                let mut cv = vec![0f32; m * n];
                for j in 0..n {
                    let out = &mut cv[j * m..(j + 1) * m];
                    for (p, &bpj) in bv[j * k..(j + 1) * k].iter().enumerate() {
                        for (o, &aip) in out.iter_mut().zip(&av[p * m..(p + 1) * m]) {
                            *o += aip * bpj;
                        }
                    }
                }
                write_f32(mem, c, &cv)
            }),
        }
    }

    /// `out[t] = Σ_k taps[k]·input[t + k]` for `t + ntaps <= n`.
    pub fn fir(
        &self,
        s: &Stream,
        input: DevicePtr,
        taps: DevicePtr,
        out: DevicePtr,
        n: u32,
        ntaps: u32,
    ) -> Res<()> {
        match &self.cuda {
            Some(c) => Self::on_cuda(s, |cs| {
                let f = self.funcs(c, s, cs)?;
                let mut b = cs.launch_builder(&f.fir);
                b.arg(&input.0).arg(&taps.0).arg(&out.0).arg(&n).arg(&ntaps);
                // SAFETY: input and out hold n floats, taps ntaps floats, all pinned by the
                // caller's session until this stream's work completes.
                unsafe { b.launch(LaunchConfig::for_num_elems(n)) }?;
                Ok(())
            }),
            None => self.host(s, move |m| {
                let x = read_f32(m, input, n as usize)?;
                let h = read_f32(m, taps, ntaps as usize)?;
                let y: Vec<f32> = (0..=(n - ntaps) as usize)
                    .map(|t| h.iter().zip(&x[t..]).map(|(a, b)| a * b).sum())
                    .collect();
                write_f32(m, out, &y)
            }),
        }
    }

    /// A 3×3 convolution of one `h×w` image with `c_out` filters (9 floats each) into
    /// `c_out` planes; the border is zero.
    #[allow(clippy::too_many_arguments)]
    pub fn conv3x3(
        &self,
        s: &Stream,
        img: DevicePtr,
        filt: DevicePtr,
        out: DevicePtr,
        c_out: u32,
        h: u32,
        w: u32,
    ) -> Res<()> {
        match &self.cuda {
            Some(c) => Self::on_cuda(s, |cs| {
                let f = self.funcs(c, s, cs)?;
                let mut b = cs.launch_builder(&f.conv);
                b.arg(&img.0)
                    .arg(&filt.0)
                    .arg(&out.0)
                    .arg(&c_out)
                    .arg(&h)
                    .arg(&w);
                let cfg = LaunchConfig {
                    grid_dim: (blocks(u64::from(w), 128), h, c_out),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: img holds h·w floats, filt c_out·9, out c_out·h·w, all pinned by
                // the caller's session until this stream's work completes.
                unsafe { b.launch(cfg) }?;
                Ok(())
            }),
            None => self.host(s, move |m| {
                let (c_out, h, w) = (c_out as usize, h as usize, w as usize);
                let im = read_f32(m, img, h * w)?;
                let fl = read_f32(m, filt, c_out * 9)?;
                let mut o = vec![0f32; c_out * h * w];
                for c in 0..c_out {
                    for y in 1..h.saturating_sub(1) {
                        for x in 1..w.saturating_sub(1) {
                            let mut acc = 0f32;
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    acc += fl[c * 9 + dy * 3 + dx]
                                        * im[(y + dy - 1) * w + (x + dx - 1)];
                                }
                            }
                            o[(c * h + y) * w + x] = acc;
                        }
                    }
                }
                write_f32(m, out, &o)
            }),
        }
    }

    fn host<F>(&self, s: &Stream, kernel: F) -> Res<()>
    where
        F: FnOnce(&SimMemory<'_>) -> gpushare::device::Result<()> + Send + 'static,
    {
        let sim = self
            .dev
            .as_sim()
            .ok_or("host kernels need the simulated device")?;
        sim.launch_host(s, kernel)?;
        Ok(())
    }
}

/// Read `n` floats at the start of `range` in `stream` order, waiting for them.
pub fn read_back(dev: &dyn Device, s: &Stream, range: DeviceRange, n: usize) -> Res<Vec<f32>> {
    let mut b = vec![0u8; n * 4];
    let src = range.slice(0, b.len() as u64)?;
    dev.read_sync(&mut b, src, s)?;
    Ok(floats(&b))
}

/// Little-endian bytes of `v`.
pub fn to_bytes(v: &[f32]) -> Vec<u8> {
    bytes(v)
}
