//! Encoding a chunk the way tiktoken does, so our ids and tiktoken's are interchangeable.
//!
//! Why this is here although the pipeline never calls it (echovlm/tokenizer.py encodes with tiktoken): it is
//! the reference that ties the trainer to tiktoken. Merges counted on our splitter's chunks (split.rs) are only
//! the right merges if tiktoken cuts the same text at the same places and applies them in the same order;
//! tests/test_rustbpe.py::test_encode_matches_tiktoken checks both at once by comparing `Tokenizer.encode` with
//! tiktoken's `encode_ordinary` on random text. It also keeps the Python API nanochat's rustbpe has.

use ahash::AHashMap;

/// Append the token ids of one pre-split chunk to `out`: a chunk that is itself a token is one id;
/// otherwise start from single bytes and repeatedly join the adjacent pair whose joined bytes have
/// the lowest rank (leftmost on ties) until no joined pair is a token.
pub fn encode_chunk(chunk: &[u8], ranks: &AHashMap<Vec<u8>, u32>, out: &mut Vec<u32>) {
    if let Some(&id) = ranks.get(chunk) {
        out.push(id);
        return;
    }
    // part i is chunk[starts[i]..starts[i + 1]]; join_rank[i] is the rank of parts i and i + 1 joined
    let mut starts: Vec<usize> = (0..=chunk.len()).collect();
    let rank_of = |starts: &[usize], i: usize| -> u32 {
        match starts.get(i + 2) {
            Some(&end) => ranks
                .get(&chunk[starts[i]..end])
                .copied()
                .unwrap_or(u32::MAX),
            None => u32::MAX,
        }
    };
    let mut join_rank: Vec<u32> = (0..chunk.len()).map(|i| rank_of(&starts, i)).collect();
    loop {
        // min_by_key keeps the first of equal minima: the leftmost pair, as tiktoken does
        let Some((i, &best)) = join_rank.iter().enumerate().min_by_key(|&(_, &r)| r) else {
            break;
        };
        if best == u32::MAX {
            break;
        }
        starts.remove(i + 1);
        join_rank.remove(i + 1);
        join_rank[i] = rank_of(&starts, i);
        if i > 0 {
            join_rank[i - 1] = rank_of(&starts, i - 1);
        }
    }
    for w in starts.windows(2) {
        out.push(ranks[&chunk[w[0]..w[1]]]);
    }
}
