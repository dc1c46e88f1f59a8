//! Byte-level BPE training: count the chunks, then repeatedly merge the most frequent adjacent pair.
//!
//! Training runs on unique chunks weighted by how often they occur, so a corpus of millions of words
//! is a few tens of thousands of short byte strings. Each merge only visits the chunks that contain
//! the merged pair (found through a pair -> chunk index) and updates pair counts by the difference,
//! instead of recounting everything.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use rayon::prelude::*;

use crate::split::Splitter;

pub type Pair = (u32, u32);

/// Split every document of a batch in parallel and add its chunk counts to `counts`.
pub fn count_chunks(
    splitter: &Splitter,
    docs: &[String],
    counts: &mut AHashMap<String, i64>,
) -> Result<(), String> {
    // per-thread maps borrow the chunks from `docs`; only chunks new to `counts` get allocated
    let batch = docs
        .par_iter()
        .try_fold(AHashMap::<&str, i64>::new, |mut local, doc| {
            splitter.for_each(doc, |chunk| *local.entry(chunk).or_default() += 1)?;
            Ok::<_, String>(local)
        })
        .try_reduce(AHashMap::new, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (chunk, n) in small {
                *big.entry(chunk).or_default() += n;
            }
            Ok(big)
        })?;
    for (chunk, n) in batch {
        match counts.get_mut(chunk) {
            Some(total) => *total += n,
            None => {
                counts.insert(chunk.to_owned(), n);
            }
        }
    }
    Ok(())
}

/// Merge every non-overlapping occurrence of `pair` (left to right) into `new_id`, in place, and
/// report each change in adjacent-pair counts to `delta(pair, +1 | -1)`. Changes to `pair` itself
/// may be incomplete: the caller drops that pair altogether.
fn merge_word(word: &mut Vec<u32>, pair: Pair, new_id: u32, mut delta: impl FnMut(Pair, i64)) {
    let (a, b) = pair;
    let n = word.len();
    let (mut read, mut write) = (0, 0);
    while read < n {
        if read + 1 < n && word[read] == a && word[read + 1] == b {
            // the left neighbour is read from the output, so in "a a a a" merging (a, a) the
            // second merge sees the first's new token and the counts cancel correctly
            if write > 0 {
                let left = word[write - 1];
                delta((left, a), -1);
                delta((left, new_id), 1);
            }
            if read + 2 < n {
                let right = word[read + 2];
                delta((b, right), -1);
                delta((new_id, right), 1);
            }
            word[write] = new_id;
            read += 2;
        } else {
            word[write] = word[read];
            read += 1;
        }
        write += 1;
    }
    word.truncate(write);
}

/// Learn up to `n_merges` merges from chunk counts. Merge i creates token 256 + i. Ties between
/// equally frequent pairs go to the smallest (left, right) pair so training is deterministic.
/// Returns fewer merges when no adjacent pair is left (every chunk is a single token).
pub fn learn_merges(chunk_counts: AHashMap<String, i64>, n_merges: usize) -> Vec<Pair> {
    let (mut words, freqs): (Vec<Vec<u32>>, Vec<i64>) = chunk_counts
        .into_iter()
        .filter(|(chunk, _)| chunk.len() > 1)
        .map(|(chunk, n)| (chunk.bytes().map(u32::from).collect(), n))
        .unzip();

    let mut pair_counts: AHashMap<Pair, i64> = AHashMap::new();
    let mut pair_words: AHashMap<Pair, Vec<u32>> = AHashMap::new();
    for (wi, word) in words.iter().enumerate() {
        let wi = wi as u32;
        for w in word.windows(2) {
            let pair = (w[0], w[1]);
            *pair_counts.entry(pair).or_default() += freqs[wi as usize];
            let list = pair_words.entry(pair).or_default();
            if list.last() != Some(&wi) {
                list.push(wi);
            }
        }
    }

    // Lazy max-heap: an entry's count may be stale. A pair's count only grows during the merge that
    // creates its newer token (when it is pushed); afterwards it only shrinks, so stale entries are
    // upper bounds and re-pushing them with the current count when popped keeps the order exact.
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> = pair_counts
        .iter()
        .map(|(&pair, &n)| (n, Reverse(pair)))
        .collect();
    let mut merges = Vec::with_capacity(n_merges);
    // pairs holding the new token: (count, chunks holding it), gathered in a small map during a merge
    let mut fresh: AHashMap<Pair, (i64, Vec<u32>)> = AHashMap::new();
    while merges.len() < n_merges {
        let Some((n, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != n {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);
        pair_counts.remove(&pair);
        for wi in pair_words.remove(&pair).unwrap_or_default() {
            let freq = freqs[wi as usize];
            merge_word(&mut words[wi as usize], pair, new_id, |p, d| {
                if p.0 == new_id || p.1 == new_id {
                    let (count, list) = fresh.entry(p).or_default();
                    *count += d * freq;
                    if d > 0 && list.last() != Some(&wi) {
                        list.push(wi);
                    }
                } else if let Some(count) = pair_counts.get_mut(&p) {
                    // older pairs only shrink; their heap entries are corrected when popped
                    *count += d * freq;
                }
            });
        }
        for (p, (count, list)) in fresh.drain() {
            if count > 0 {
                pair_counts.insert(p, count);
                pair_words.insert(p, list);
                heap.push((count, Reverse(p)));
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_word_keeps_pair_counts_exact() {
        // recount from scratch and compare with the reported differences
        let pairs = |w: &[u32]| {
            let mut m: AHashMap<Pair, i64> = AHashMap::new();
            for x in w.windows(2) {
                *m.entry((x[0], x[1])).or_default() += 1;
            }
            m
        };
        for word in [
            vec![1, 1, 1, 1],
            vec![1, 1, 1],
            vec![2, 1, 1, 2, 1, 1, 1],
            vec![1, 2, 1, 2],
            vec![3],
        ] {
            let mut w = word.clone();
            let mut counts = pairs(&word);
            counts.remove(&(1, 1));
            merge_word(&mut w, (1, 1), 9, |p, d| *counts.entry(p).or_default() += d);
            counts.remove(&(1, 1));
            counts.retain(|_, n| *n != 0);
            let mut expected = pairs(&w);
            expected.remove(&(1, 1));
            assert_eq!(counts, expected, "word {word:?} -> {w:?}");
        }
    }

    #[test]
    fn stops_when_nothing_is_left_to_merge() {
        let counts: AHashMap<String, i64> = [("ab".to_string(), 3), ("c".to_string(), 5)]
            .into_iter()
            .collect();
        assert_eq!(learn_merges(counts, 10), vec![(97, 98)]);
    }
}
