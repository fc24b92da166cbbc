//! The KV-cache block pool: which blocks are free. The cache memory itself belongs to the
//! model; the scheduler hands its block numbers to sequences.
pub struct BlockPool {
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(blocks: usize) -> Self {
        // Lowest numbers first, so a lone sequence fills the pool from its start.
        Self {
            free: (0..blocks as u32).rev().collect(),
        }
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Appends `n` blocks to `table`, or takes none and returns false when fewer are free.
    pub fn take(&mut self, n: usize, table: &mut Vec<u32>) -> bool {
        if n > self.free.len() {
            return false;
        }
        table.extend(self.free.drain(self.free.len() - n..).rev());
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_taken_whole_or_not_at_all_and_come_back() {
        let mut pool = BlockPool::new(4);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(pool.take(3, &mut a));
        assert!(!pool.take(2, &mut b), "two of one free block");
        assert!(b.is_empty());
        assert!(pool.take(1, &mut b));
        assert_eq!((a.as_slice(), b.as_slice()), (&[0, 1, 2][..], &[3][..]));
        pool.release(&mut a);
        assert!(a.is_empty());
        assert_eq!(pool.available(), 3);
    }
}
