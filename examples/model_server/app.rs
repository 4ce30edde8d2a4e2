//! The model server's application: models on one runtime, and the HTTP routes over them.
//! Shared by `main.rs` and the integration test `tests/model_server.rs`.

// Each of the two users uses a part of it.
#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gpushare::qos::ContextSpec;
use gpushare::{Buffer, Context, Runtime, RuntimeError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a request waits for a session on its model before it is answered 503 (with
/// `Retry-After`): a client that gave up is better told than served late. (The wait holds
/// no thread, and ends when the client goes: the session is awaited, and dropped with the
/// request.)
pub const SESSION_WAIT: Duration = Duration::from_secs(30);

/// Bytes of weights each request reads.
pub const WINDOW: u64 = 256;
/// Tensors each model's weights are split into.
pub const TENSORS: u64 = 4;
const BUCKETS_MS: [f64; 10] = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0, 1000.0];

/// A model to host.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// Its name in the URL.
    pub name: String,
    /// Its context's admission spec.
    pub spec: ContextSpec,
    /// Bytes of weights.
    pub weights: u64,
    /// Seed of the weights' contents.
    pub seed: u8,
}

/// Byte `i` of the weights of the model with `seed`: a hash of both, so that no two
/// windows of the weights hold the same bytes (a restore that put a chunk in the wrong
/// place, or left one out, shows).
pub fn weight_byte(seed: u8, i: u64) -> u8 {
    let x = (i ^ u64::from(seed) << 56).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Where a request with `n` inputs reads: which tensor, and where in it (tensors of
/// `tensor_size` bytes).
pub fn window(n: usize, tensor_size: u64) -> (u64, u64) {
    (
        n as u64 % TENSORS,
        (n as u64 * 4099) % (tensor_size - WINDOW),
    )
}

/// Byte `i` of tensor `t` of the model with `seed`.
pub fn tensor_byte(seed: u8, t: u64, i: u64) -> u8 {
    weight_byte(seed.wrapping_add(t as u8 * 16), i)
}

/// The answer a request should get: the inputs dotted with a window of the weights
/// (`weights` bytes in all).
pub fn expected(seed: u8, weights: u64, input: &[f64]) -> f64 {
    let (t, off) = window(input.len(), weights / TENSORS);
    input
        .iter()
        .enumerate()
        .map(|(i, x)| x * f64::from(tensor_byte(seed, t, off + (i as u64 % WINDOW))))
        .sum()
}

struct Model {
    ctx: Context,
    tensors: Vec<Buffer>,
    seed: u8,
}

#[derive(Default)]
struct Metrics {
    requests: u64,
    errors: u64,
    /// Requests whose client went while they waited for a session.
    abandoned: u64,
    buckets: [u64; BUCKETS_MS.len()],
    sum_ms: f64,
}

/// The models and their metrics.
pub struct App {
    rt: Runtime,
    models: BTreeMap<String, Model>,
    metrics: Mutex<BTreeMap<String, Metrics>>,
}

impl App {
    /// Create the models' contexts and load their weights.
    pub fn new(rt: Runtime, specs: &[ModelSpec]) -> Result<Self, RuntimeError> {
        let mut models = BTreeMap::new();
        for m in specs {
            let ctx = rt.create_context(m.spec.clone())?;
            let size = m.weights / TENSORS;
            let mut tensors = Vec::new();
            for t in 0..TENSORS {
                let b = ctx.create_buffer(size)?;
                let data: Vec<u8> = (0..size).map(|i| tensor_byte(m.seed, t, i)).collect();
                ctx.session()?.write(&b, 0, &data)?;
                tensors.push(b);
            }
            models.insert(
                m.name.clone(),
                Model {
                    ctx,
                    tensors,
                    seed: m.seed,
                },
            );
        }
        Ok(App {
            rt,
            metrics: Mutex::new(
                models
                    .keys()
                    .map(|k| (k.clone(), Metrics::default()))
                    .collect(),
            ),
            models,
        })
    }

    /// The runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.rt
    }

    /// The context of model `name`.
    pub fn context(&self, name: &str) -> Option<&Context> {
        self.models.get(name).map(|m| &m.ctx)
    }

    /// Read every byte of every model's weights back and compare them with what was
    /// written: they survive any number of evictions and restores. Blocks the thread.
    pub fn check_weights(&self) -> Result<(), String> {
        let mut back = Vec::new();
        for (name, m) in &self.models {
            let mut s = m.ctx.session().map_err(|e| e.to_string())?;
            for (t, b) in m.tensors.iter().enumerate() {
                back.resize(b.size() as usize, 0);
                s.read(b, 0, &mut back).map_err(|e| e.to_string())?;
                if let Some(i) =
                    (0..b.size()).find(|&i| back[i as usize] != tensor_byte(m.seed, t as u64, i))
                {
                    return Err(format!("{name}: byte {i} of tensor {t} differs"));
                }
            }
        }
        Ok(())
    }
}

/// A request body.
#[derive(Deserialize)]
pub struct InferRequest {
    /// Inputs.
    pub input: Vec<f64>,
}

/// A response body.
#[derive(Serialize, Deserialize, Debug)]
pub struct InferResponse {
    /// The model.
    pub model: String,
    /// The answer.
    pub output: f64,
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": msg.to_string() })),
    )
        .into_response()
}

/// A request waiting for its session; dropped before it is forgotten, it counts the request
/// as abandoned.
struct Abandoned<'a> {
    app: &'a App,
    model: &'a str,
}

impl Abandoned<'_> {
    /// The wait ended: the request is answered, whatever the outcome.
    fn waited(self) {
        std::mem::forget(self);
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let mut metrics = self.app.metrics.lock();
        metrics.entry(self.model.to_string()).or_default().abandoned += 1;
    }
}

async fn infer(State(app): State<Arc<App>>, Path(name): Path<String>, body: Bytes) -> Response {
    if !app.models.contains_key(&name) {
        return error(StatusCode::NOT_FOUND, format!("no model named {name:?}"));
    }
    let req: InferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed body: {e}")),
    };
    if req.input.is_empty() || req.input.len() > 1 << 16 {
        return error(
            StatusCode::BAD_REQUEST,
            "input must hold 1 to 65536 numbers",
        );
    }
    let t = Instant::now();
    let m = &app.models[&name];
    // Counts the request as abandoned if its future is dropped (its client went) while it
    // waits for its session, the one point where it can be.
    let waiting = Abandoned {
        app: &app,
        model: &name,
    };
    // The session is awaited: waiting in line holds no thread, and a request whose client
    // goes (its future dropped) leaves the line at once; a restore of its weights already
    // under way, on one of tokio's blocking threads, stops before its next buffer.
    let waited = tokio::time::timeout(SESSION_WAIT, m.ctx.session_async()).await;
    waiting.waited();
    let task = match waited {
        Err(_) => {
            let mut metrics = app.metrics.lock();
            let mt = metrics.entry(name.clone()).or_default();
            mt.requests += 1;
            mt.errors += 1;
            drop(metrics);
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no session on {name:?} within {} s: the other models hold the memory its weights need; retry later",
                    SESSION_WAIT.as_secs()
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
        Ok(Err(e)) => Ok(Err(e)),
        // The read waits for its copy: the worker's other tasks move to another thread
        // meanwhile.
        Ok(Ok(mut s)) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(|| {
                let (t, off) = window(req.input.len(), m.tensors[0].size());
                let mut w = vec![0u8; WINDOW as usize];
                s.read(&m.tensors[t as usize], off, &mut w)?;
                Ok::<f64, RuntimeError>(
                    req.input
                        .iter()
                        .enumerate()
                        .map(|(i, x)| x * f64::from(w[i % WINDOW as usize]))
                        .sum(),
                )
            })
        })),
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let mut metrics = app.metrics.lock();
    let mt = metrics.entry(name.clone()).or_default();
    mt.requests += 1;
    let result = match task {
        Ok(r) => r,
        Err(_) => {
            mt.errors += 1;
            drop(metrics);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request's work panicked",
            );
        }
    };
    match result {
        Ok(output) if !output.is_finite() => {
            mt.errors += 1;
            drop(metrics);
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the output is not a finite number; scale the input down",
            )
        }
        Ok(output) => {
            mt.sum_ms += ms;
            for (b, &le) in mt.buckets.iter_mut().zip(&BUCKETS_MS) {
                if ms <= le {
                    *b += 1;
                }
            }
            drop(metrics);
            Json(InferResponse {
                model: name,
                output,
            })
            .into_response()
        }
        Err(e) => {
            mt.errors += 1;
            drop(metrics);
            // Memory that others hold now is worth a retry; a model whose weights can
            // never be resident, or any other failure, is not.
            match e {
                RuntimeError::SessionTimedOut { .. }
                | RuntimeError::OutOfMemory { .. }
                | RuntimeError::ReservedElsewhere { .. }
                | RuntimeError::PressureDenied { .. }
                | RuntimeError::LineFull { .. }
                | RuntimeError::TooManySessions { .. } => {
                    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e);
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                    r
                }
                _ => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
    }
}

async fn status(State(app): State<Arc<App>>) -> Response {
    let snap = app.rt.snapshot();
    Json(serde_json::json!({
        "snapshot": snap,
        "waiting_sessions": app.rt.waiting_sessions(),
        "models": app.models.iter().map(|(n, m)| (n.clone(), serde_json::json!({
            "seed": m.seed,
            "weights_bytes": m.tensors.iter().map(Buffer::size).sum::<u64>(),
            "tier": m.ctx.tier().to_string(),
        }))).collect::<BTreeMap<_, _>>(),
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let snap = app.rt.snapshot();
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE gpushare_waiting_sessions gauge");
    let _ = writeln!(
        out,
        "gpushare_waiting_sessions {}",
        app.rt.waiting_sessions()
    );
    let _ = writeln!(out, "# TYPE gpushare_available_bytes gauge");
    let _ = writeln!(out, "gpushare_available_bytes {}", snap.available_bytes);
    for (metric, kind) in [
        ("gpushare_context_used_bytes", "gauge"),
        ("gpushare_context_peak_bytes", "gauge"),
        ("gpushare_context_resident_bytes", "gauge"),
        ("gpushare_context_evicted_bytes", "gauge"),
        ("gpushare_context_evictions_total", "counter"),
        ("gpushare_context_restores_total", "counter"),
    ] {
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        for c in &snap.contexts {
            let v = match metric {
                "gpushare_context_used_bytes" => c.used_bytes,
                "gpushare_context_peak_bytes" => c.peak_bytes,
                "gpushare_context_resident_bytes" => c.resident_bytes,
                "gpushare_context_evicted_bytes" => c.evicted_bytes,
                "gpushare_context_evictions_total" => c.evictions,
                _ => c.restores,
            };
            let _ = writeln!(out, "{metric}{{context=\"{}\"}} {v}", c.name);
        }
    }
    let metrics = app.metrics.lock();
    for metric in [
        "gpushare_request_errors_total",
        "gpushare_requests_abandoned_total",
    ] {
        let _ = writeln!(out, "# TYPE {metric} counter");
        for (name, m) in metrics.iter() {
            let v = match metric {
                "gpushare_request_errors_total" => m.errors,
                _ => m.abandoned,
            };
            let _ = writeln!(out, "{metric}{{model=\"{name}\"}} {v}");
        }
    }
    let _ = writeln!(out, "# TYPE gpushare_request_duration_ms histogram");
    for (name, m) in metrics.iter() {
        for (b, le) in m.buckets.iter().zip(BUCKETS_MS) {
            let _ = writeln!(
                out,
                "gpushare_request_duration_ms_bucket{{model=\"{name}\",le=\"{le}\"}} {b}"
            );
        }
        let ok = m.requests - m.errors;
        let _ = writeln!(
            out,
            "gpushare_request_duration_ms_bucket{{model=\"{name}\",le=\"+Inf\"}} {ok}"
        );
        let _ = writeln!(
            out,
            "gpushare_request_duration_ms_sum{{model=\"{name}\"}} {}",
            m.sum_ms
        );
        let _ = writeln!(
            out,
            "gpushare_request_duration_ms_count{{model=\"{name}\"}} {ok}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The HTTP routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/models/{name}/infer", post(infer))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// Four models whose weights together exceed `capacity`: two LLMs (Guaranteed and
/// Burstable), a vision and an embedding model (BestEffort).
pub fn default_models(capacity: u64) -> Vec<ModelSpec> {
    let w = capacity / 3 / (TENSORS << 20) * (TENSORS << 20);
    vec![
        ModelSpec {
            name: "llm".into(),
            spec: ContextSpec::new("llm", w + (8 << 20)).base(w + (8 << 20)),
            weights: w,
            seed: 11,
        },
        ModelSpec {
            name: "chat".into(),
            spec: ContextSpec::new("chat", w + (8 << 20)).base(8 << 20),
            weights: w,
            seed: 22,
        },
        ModelSpec {
            name: "vision".into(),
            spec: ContextSpec::new("vision", w + (8 << 20)),
            weights: w,
            seed: 33,
        },
        ModelSpec {
            name: "embed".into(),
            spec: ContextSpec::new("embed", w / 2 + (8 << 20)),
            weights: w / 2,
            seed: 44,
        },
    ]
}
