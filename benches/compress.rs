//! What each compression level costs and saves on JavaScript-like text (the load benchmark's
//! `/js/` bodies): bytes out and milliseconds per body, for the levels `compress:` uses and
//! their neighbours. A bounded program (each row runs for about half a second), release:
//!
//! ```sh
//! cargo bench --bench compress
//! ```

use std::time::{Duration, Instant};

use sidecache::compress::encode;
use sidecache::negotiate::Coding;

/// Statements built from a vocabulary with varied identifiers and numbers (as `loadtool`'s).
fn script(len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "function", "return", "const", "props", "state", "render", "value", "index", "length", "push", "map", "filter",
        "document", "window", "dispatch", "payload",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out = String::new();
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let w = |x: u64| WORDS[(x % WORDS.len() as u64) as usize];
        out.push_str(&format!(
            "function f{}({}, {}) {{ return {}.{}({}); }}\n",
            state % 977,
            w(state),
            w(state >> 8),
            w(state >> 16),
            w(state >> 24),
            state % 1000
        ));
    }
    out.truncate(len);
    out.into_bytes()
}

fn main() {
    let rows = [
        (Coding::Br, 11),
        (Coding::Br, 10),
        (Coding::Br, 9),
        (Coding::Br, 5),
        (Coding::Zstd, 19),
        (Coding::Zstd, 15),
        (Coding::Zstd, 3),
        (Coding::Gzip, 9),
        (Coding::Gzip, 6),
    ];
    println!("| body | coding | level | bytes out | of the body | ms per body | MB/s |");
    println!("|---|---|---|---|---|---|---|");
    for size in [24usize << 10, 128 << 10] {
        let body = script(size);
        for (coding, level) in rows {
            let started = Instant::now();
            let (mut runs, mut len) = (0u32, 0usize);
            while started.elapsed() < Duration::from_millis(500) || runs == 0 {
                len = encode(coding, level, &body).expect("encodes").len();
                runs += 1;
            }
            let per = started.elapsed().as_secs_f64() / f64::from(runs);
            println!(
                "| {} KiB | {} | {level} | {len} | {:.1}% | {:.2} | {:.2} |",
                size >> 10,
                coding.token(),
                100.0 * len as f64 / size as f64,
                per * 1e3,
                size as f64 / per / 1e6
            );
        }
    }
}
