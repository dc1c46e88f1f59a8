//! rustbpe: a fast byte-level BPE trainer whose output tiktoken can encode with.
//!
//! Python API (the names nanochat's rustbpe uses): `Tokenizer()`, `train_from_iterator(iterator,
//! vocab_size, buffer_size=8192, pattern=None)`, `get_pattern()`, `get_mergeable_ranks()`, `encode(text)`.
//! echovlm trains here and encodes with tiktoken; `encode` is kept as the check that the two agree
//! (see encode.rs).

mod encode;
mod split;
mod train;

use std::ffi::CString;

use ahash::AHashMap;
use pyo3::exceptions::{PyRuntimeWarning, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use split::Splitter;

#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    /// bytes of every token: the 256 single bytes, then one per merge
    vocab: Vec<Vec<u8>>,
    ranks: AHashMap<Vec<u8>, u32>,
}

fn byte_vocab() -> Vec<Vec<u8>> {
    (0..=255u8).map(|b| vec![b]).collect()
}

fn rank_map(vocab: &[Vec<u8>]) -> AHashMap<Vec<u8>, u32> {
    vocab
        .iter()
        .enumerate()
        .map(|(i, bytes)| (bytes.clone(), i as u32))
        .collect()
}

#[pymethods]
impl Tokenizer {
    /// An untrained tokenizer: the 256 byte tokens and the default (GPT-4 style) split pattern.
    #[new]
    fn new() -> Self {
        let pattern = split::default_pattern();
        let splitter = Splitter::new(&pattern).expect("the default pattern compiles");
        let vocab = byte_vocab();
        let ranks = rank_map(&vocab);
        Tokenizer {
            pattern,
            splitter,
            vocab,
            ranks,
        }
    }

    /// Train on the strings of any Python iterator until the vocabulary (256 bytes + merges) has
    /// `vocab_size` tokens, or warn and stop early when no pair is left to merge. Strings are pulled
    /// `buffer_size` at a time under the GIL; each buffer is split and counted in parallel without it.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(split::default_pattern);
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;

        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        let mut items = iterator.try_iter()?;
        let mut exhausted = false;
        while !exhausted {
            buffer.clear();
            while buffer.len() < buffer_size {
                match items.next() {
                    Some(item) => buffer.push(item?.extract::<String>().map_err(|e| {
                        PyTypeError::new_err(format!(
                            "train_from_iterator expects an iterator of str: {e}"
                        ))
                    })?),
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            py.allow_threads(|| train::count_chunks(&splitter, &buffer, &mut counts))
                .map_err(PyValueError::new_err)?;
        }

        let n_merges = vocab_size - 256;
        let merges = py.allow_threads(|| train::learn_merges(counts, n_merges));
        let mut vocab = byte_vocab();
        for &(a, b) in &merges {
            let joined = [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat();
            vocab.push(joined);
        }
        if merges.len() < n_merges {
            let msg = format!(
                "rustbpe: stopped early at vocab size {} of {vocab_size}: no pair of adjacent tokens is left to merge",
                vocab.len()
            );
            PyErr::warn(
                py,
                &py.get_type::<PyRuntimeWarning>(),
                &CString::new(msg)?,
                1,
            )?;
        }
        self.ranks = rank_map(&vocab);
        self.vocab = vocab;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// (token bytes, rank) for every token: single bytes at ranks 0..255, then the merges in order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        self.vocab
            .iter()
            .enumerate()
            .map(|(i, b)| (PyBytes::new(py, b), i as u32))
            .collect()
    }

    /// Token ids of `text`, identical to tiktoken's encode_ordinary with the same ranks and pattern.
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| {
            let mut ids = Vec::new();
            self.splitter.for_each(text, |chunk| {
                encode::encode_chunk(chunk.as_bytes(), &self.ranks, &mut ids)
            })?;
            Ok::<_, String>(ids)
        })
        .map_err(PyValueError::new_err)
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    Ok(())
}
