//! Which outbox seqs of a node were taken recently, so that an event that comes
//! twice (through another path, or after a supernode failover) is published once.

/// Seqs remembered per node: the newest seq seen and this many below it.
pub const WINDOW: i64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

/// A sliding window over a node's outbox seqs, one bit each: 512 bytes once the
/// node sent an event, nothing before. Seqs below the window are taken as new
/// (an agent whose database was replaced starts again at 1).
#[derive(Debug, Default)]
pub struct SeqWindow {
    high: i64,
    bits: Option<Box<[u64; WORDS]>>,
}

impl SeqWindow {
    /// Records `seq`; false when it was recorded already.
    pub fn insert(&mut self, seq: i64) -> bool {
        let bits = self.bits.get_or_insert_with(|| Box::new([0; WORDS]));
        if seq > self.high {
            // Slide: clear the slots of the seqs the window now passes over.
            let advance = (seq - self.high).min(WINDOW);
            for s in (seq - advance + 1)..=seq {
                let slot = s.rem_euclid(WINDOW) as usize;
                bits[slot / 64] &= !(1 << (slot % 64));
            }
            self.high = seq;
        } else if seq <= self.high - WINDOW {
            return true;
        }
        let slot = seq.rem_euclid(WINDOW) as usize;
        let (word, bit) = (slot / 64, 1u64 << (slot % 64));
        let seen = bits[word] & bit != 0;
        bits[word] |= bit;
        !seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seq_is_new_once() {
        let mut w = SeqWindow::default();
        assert!(w.bits.is_none(), "nothing is allocated before the first event");
        assert!(w.insert(7));
        assert!(!w.insert(7), "the same event again");
        assert!(w.insert(8) && w.insert(5), "older seqs within the window are new once");
        assert!(!w.insert(5) && !w.insert(8));
    }

    #[test]
    fn the_window_slides_and_forgets_what_falls_out() {
        let mut w = SeqWindow::default();
        assert!(w.insert(1));
        assert!(w.insert(1 + WINDOW - 1));
        assert!(!w.insert(1), "still in the window");
        assert!(w.insert(2 + WINDOW), "slides past seq 1 and 2");
        assert!(w.insert(1), "below the window: taken as new");
        let far = 10 * WINDOW;
        assert!(w.insert(far));
        assert!(w.insert(far - WINDOW + 1), "a jump clears every slot");
        assert!(!w.insert(far - WINDOW + 1));
    }

    #[test]
    fn every_recent_seq_is_a_duplicate_the_second_time() {
        let mut w = SeqWindow::default();
        for seq in (1..=100).rev() {
            assert!(w.insert(seq));
        }
        for seq in 1..=100 {
            assert!(!w.insert(seq));
        }
    }
}
