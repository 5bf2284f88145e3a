//! The short fuzzing pass `make test` runs: every input of the committed corpora
//! (`fuzz/corpus/<target>`, grown and minimised by cargo-fuzz, and the hand-written
//! `fuzz/seeds/<target>`) is replayed through the fuzz targets' checks, then a fixed number of
//! deterministic mutations of each (bit flips, byte edits, splices, truncations). The long runs
//! use cargo-fuzz: see fuzz/README.md.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["corpus", "seeds"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
            files.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    files.sort();
    // (A fuzzer running on the corpus may remove a file between listing and reading.)
    let inputs: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    assert!(!inputs.is_empty(), "no corpus for {target}");
    inputs
}

/// xorshift64*: the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"-1",
    b"18446744073709551616",
    b"\xff",
    b"\xc3\x28",
    b"\0",
    b"\"op\"",
    b"\"channel\"",
    b"*",
    b"=",
    b"\n",
    b"1e999",
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 if !out.is_empty() => {
                let i = rng.below(out.len());
                let n = 1 + rng.below(8).min(out.len() - i - 1);
                out.drain(i..(i + n).min(out.len()));
            }
            3 => {
                let i = rng.below(out.len() + 1);
                let token = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, token.iter().copied());
            }
            4 if !other.is_empty() => {
                let i = rng.below(out.len() + 1);
                let j = rng.below(other.len());
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
            }
            _ => {
                let i = rng.below(out.len() + 1);
                out.truncate(i);
            }
        }
    }
    out
}

/// Replays the corpus, then `mutations` mutated inputs spread over it.
fn pass(target: &str, check: fn(&[u8]), mutations: usize) {
    let corpus = inputs(target);
    for input in &corpus {
        check(input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    for i in 0..mutations {
        let input = &corpus[i % corpus.len()];
        let other = &corpus[rng.below(corpus.len())];
        check(&mutate(&mut rng, input, other));
    }
}

#[test]
fn command_corpus_and_mutations() {
    pass("command", gateway::fuzzing::command, 100_000);
}

#[test]
fn cursor_corpus_and_mutations() {
    pass("cursor", gateway::fuzzing::cursor, 100_000);
}

#[test]
fn config_corpus_and_mutations() {
    pass("config", gateway::fuzzing::config, 5_000);
}

#[test]
fn frame_reader_corpus_and_mutations() {
    pass("frame_reader", gateway::fuzzing::frame_reader, 50_000);
}
