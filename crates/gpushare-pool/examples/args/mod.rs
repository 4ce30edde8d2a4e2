//! Positional arguments of the pool's examples. Each is checked; a bad or extra one ends
//! the run with a message and the usage line (exit status 2), `-h` or `--help` prints it.
// Each example uses a part of it.
#![allow(dead_code)]

use std::fmt::Display;
use std::str::FromStr;

/// The arguments after the program's name, read in order.
pub struct Args {
    usage: &'static str,
    rest: std::iter::Skip<std::env::Args>,
}

impl Args {
    /// The process's arguments; `usage` is printed with any error.
    pub fn new(usage: &'static str) -> Self {
        let args = Args {
            usage,
            rest: std::env::args().skip(1),
        };
        if std::env::args().skip(1).any(|a| a == "-h" || a == "--help") {
            println!("usage: {usage}");
            std::process::exit(0);
        }
        args
    }

    /// The next argument, a number from `min` to `max`; `default` if there is none.
    pub fn number<T>(&mut self, name: &str, default: T, min: T, max: T) -> T
    where
        T: FromStr + PartialOrd + Display + Copy,
    {
        let Some(a) = self.rest.next() else {
            return default;
        };
        match a.parse::<T>() {
            Ok(v) if v >= min && v <= max => v,
            _ => self.fail(&format!(
                "{name} must be a whole number from {min} to {max}, not {a:?}"
            )),
        }
    }

    /// The next argument, one of `choices` (the first if there is none).
    pub fn choice(&mut self, name: &str, choices: &[&'static str]) -> &'static str {
        let Some(a) = self.rest.next() else {
            return choices[0];
        };
        match choices.iter().find(|&&c| c == a) {
            Some(c) => c,
            None => self.fail(&format!(
                "{name} must be one of {}, not {a:?}",
                choices.join(", ")
            )),
        }
    }

    /// Check that no argument is left over.
    pub fn done(mut self) {
        if let Some(a) = self.rest.next() {
            self.fail(&format!("unexpected argument {a:?}"));
        }
    }

    fn fail(&self, why: &str) -> ! {
        eprintln!("{why}\nusage: {}", self.usage);
        std::process::exit(2);
    }
}
