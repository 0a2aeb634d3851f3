//! Property and differential tests of the prefix tree: against a naive longest-prefix
//! search, under eviction pressure, and under concurrent use.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use switchyard::policies::radix_tree::{RadixTree, SharedTree, Unit};

const PIECES: [&str; 10] = [
    "You are a helpful assistant. ",
    "Réponds en français. ",
    "日本語で答えて。",
    "🚀 launch ",
    "system: ",
    "user: ",
    "the ",
    "é",
    "è",
    "data ",
];

/// A prompt built from shared pieces, so prompts share prefixes and multi-byte characters
/// (including 'é'/'è', which share a lead byte) meet at split points.
fn prompt(rng: &mut StdRng) -> String {
    let n = rng.random_range(1..12);
    (0..n).map(|_| PIECES[rng.random_range(0..PIECES.len())]).collect()
}

/// Longest common prefix in characters.
fn common_chars(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

#[test]
fn matches_agree_with_a_naive_longest_prefix_search() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut tree = RadixTree::<u8>::new(usize::MAX);
    let mut naive: HashMap<u32, Vec<String>> = HashMap::new();
    for step in 0..3000 {
        let p = prompt(&mut rng);
        let tenant = rng.random_range(0..6);
        tree.insert(p.as_bytes(), tenant);
        naive.entry(tenant).or_default().push(p);
        let query = prompt(&mut rng);
        let m = tree.match_prefix(query.as_bytes());
        assert_eq!(m.key_size, query.chars().count());
        for t in 0..6 {
            let expected = naive.get(&t).map_or(0, |ps| ps.iter().map(|p| common_chars(p, &query)).max().unwrap_or(0));
            assert_eq!(m.of(t), expected, "step {step} tenant {t} query {query:?}");
        }
        if step % 500 == 0 {
            tree.check_invariants().unwrap();
        }
    }
    tree.check_invariants().unwrap();
    // Size is Σ over tenants of their distinct-prefix sizes.
    let total: usize = (0..6).map(|t| tree.tenant_size(t)).sum();
    assert_eq!(total, tree.total_size());
}

#[test]
fn token_keys_agree_with_naive_search() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut tree = RadixTree::<u32>::new(usize::MAX);
    let mut naive: Vec<(u32, Vec<u32>)> = Vec::new();
    for _ in 0..2000 {
        let base: u32 = rng.random_range(0..4);
        let key: Vec<u32> = (0..rng.random_range(1..40))
            .map(|i| if i < 20 { base * 100 + i } else { rng.random_range(0..3) })
            .collect();
        let tenant = rng.random_range(0..4);
        tree.insert(&key, tenant);
        naive.push((tenant, key.clone()));
        let m = tree.match_prefix(&key);
        for t in 0..4 {
            let expected = naive
                .iter()
                .filter(|(nt, _)| *nt == t)
                .map(|(_, k)| k.iter().zip(&key).take_while(|(a, b)| a == b).count())
                .max()
                .unwrap_or(0);
            assert_eq!(m.of(t), expected);
        }
    }
    tree.check_invariants().unwrap();
}

#[test]
fn eviction_keeps_the_bound_under_100k_random_inserts() {
    let mut rng = StdRng::seed_from_u64(3);
    let bound = 20_000;
    let mut tree = RadixTree::<u8>::new(bound);
    let mut naive: HashMap<u32, Vec<String>> = HashMap::new();
    for step in 0..100_000 {
        let mut p = prompt(&mut rng);
        p.push_str(&rng.random::<u32>().to_string());
        let tenant = rng.random_range(0..8);
        tree.insert(p.as_bytes(), tenant);
        let size = p.chars().count();
        assert!(tree.total_size() <= bound.max(size), "step {step}: {} > {bound}", tree.total_size());
        if step >= 99_000 {
            naive.entry(tenant).or_default().push(p);
        }
        if step % 10_000 == 0 {
            tree.check_invariants().unwrap();
        }
    }
    tree.check_invariants().unwrap();
    // Eviction only forgets: a match never exceeds what was inserted, and the newest prompts
    // (far fewer characters than the bound) are still matched in full.
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..200 {
        let q = prompt(&mut rng);
        let m = tree.match_prefix(q.as_bytes());
        for t in 0..8 {
            assert!(m.of(t) <= q.chars().count());
        }
    }
    for (t, ps) in &naive {
        let last = ps.last().unwrap();
        assert_eq!(tree.match_prefix(last.as_bytes()).of(*t), last.chars().count(), "newest prompt of {t} evicted");
    }
    // Memory stays proportional to the bound.
    assert!(tree.memory_bytes() < 64 * bound, "{} bytes for a {bound}-char bound", tree.memory_bytes());
}

#[test]
fn concurrent_inserts_and_matches_keep_invariants() {
    let bound = 50_000;
    let tree = Arc::new(SharedTree::<u8>::new(bound));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let tree = tree.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(10 + i);
                let mut longest = 0;
                for _ in 0..5_000 {
                    let mut p = prompt(&mut rng);
                    p.push_str(&rng.random::<u16>().to_string());
                    longest = longest.max(p.chars().count());
                    let m = tree.match_prefix(p.as_bytes());
                    assert!(m.tenants.iter().all(|(_, n)| *n <= m.key_size));
                    tree.insert(p.as_bytes(), rng.random_range(0..16));
                }
                longest
            })
        })
        .collect();
    let longest = threads.into_iter().map(|t| t.join().unwrap()).max().unwrap();
    tree.with(|t| {
        t.check_invariants().unwrap();
        assert!(t.total_size() <= bound + longest);
        assert!(t.total_size() > bound / 2, "the tree should be well used");
    });
}

#[test]
fn unit_boundaries() {
    let s = "aé日🚀".as_bytes();
    let boundaries: Vec<usize> = (1..s.len()).filter(|&i| u8::boundary(s, i)).collect();
    assert_eq!(boundaries, vec![1, 3, 6]);
    assert_eq!(u8::size(s), 4);
    assert_ne!(u8::head("é".as_bytes()), u8::head("è".as_bytes()));
}
