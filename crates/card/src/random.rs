//! Where the software card's randomness comes from: a source the caller passes in, never the
//! operating system, so that tests replay exactly.

/// A source of random bytes for card challenges and INITIALIZE randoms.
///
/// A real deployment passes a cryptographic generator; tests pass [`SeededRandom`].
pub trait RandomSource {
    fn fill_bytes(&mut self, dest: &mut [u8]);
}

/// A deterministic generator (SplitMix64) for tests and simulations. Not cryptographic: the
/// same seed gives the same bytes, which is the point.
#[derive(Clone, Debug)]
pub struct SeededRandom {
    state: u64,
}

impl SeededRandom {
    pub const fn new(seed: u64) -> SeededRandom {
        SeededRandom { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl RandomSource for SeededRandom {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_be_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Always the same bytes: for known-answer tests that need a given card random.
#[derive(Clone, Debug)]
pub struct FixedRandom(pub Vec<u8>);

impl RandomSource for FixedRandom {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for (i, d) in dest.iter_mut().enumerate() {
            *d = if self.0.is_empty() {
                0
            } else {
                self.0[i % self.0.len()]
            };
        }
    }
}
