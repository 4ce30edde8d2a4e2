//! Helpers shared by the examples: logging set-up and `--flag value` parsing.
#![allow(dead_code)]

/// Log to stderr, at `RUST_LOG` or else `default`.
pub fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// `--name value` flags, checked against the names an example accepts.
pub struct Flags {
    pairs: Vec<(String, String)>,
}

impl Flags {
    /// Parse the process arguments. `--help` prints `usage` and exits; an unknown flag or a
    /// flag without a value exits with status 2.
    pub fn parse(known: &[&str], usage: &str) -> Flags {
        let mut pairs = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(f) = it.next() {
            if f == "-h" || f == "--help" {
                println!("{usage}");
                std::process::exit(0);
            }
            if !known.contains(&f.as_str()) {
                fail(&format!("unknown flag {f}; {usage}"));
            }
            match it.next() {
                Some(v) => pairs.push((f, v)),
                None => fail(&format!("{f} needs a value")),
            }
        }
        Flags { pairs }
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A positive number, or `default` when the flag is absent.
    pub fn positive(&self, name: &str, default: f64) -> f64 {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => x,
                _ => fail(&format!("{name} needs a positive number, not {v:?}")),
            },
        }
    }

    /// A whole number of at least 1, or `default` when the flag is absent.
    pub fn count(&self, name: &str, default: u64) -> u64 {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(x) if x >= 1 => x,
                _ => fail(&format!(
                    "{name} needs a whole number of at least 1, not {v:?}"
                )),
            },
        }
    }

    /// A string, or `default`.
    pub fn text(&self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_string()
    }
}

/// Print the message and exit with status 2 (bad usage).
pub fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}
