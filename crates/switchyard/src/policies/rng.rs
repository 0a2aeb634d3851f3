//! The injectable random source policies share: seeded for tests and simulation,
//! from the thread RNG otherwise.

use std::sync::Mutex;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A small RNG behind a mutex (held for one draw only).
#[derive(Debug)]
pub struct PolicyRng(Mutex<SmallRng>);

impl PolicyRng {
    /// Seeded when `seed` is given, else seeded from the thread RNG.
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => SmallRng::seed_from_u64(s),
            None => SmallRng::from_rng(&mut rand::rng()),
        };
        Self(Mutex::new(rng))
    }

    /// A uniform index in `0..n` (`n` > 0).
    pub fn index(&self, n: usize) -> usize {
        let mut rng = self.0.lock().unwrap_or_else(|p| p.into_inner());
        rng.random_range(0..n)
    }
}
