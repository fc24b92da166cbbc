//! The KV-cache block pool: which blocks are held, by how many sequences, and which hold a
//! known prefix. The cache memory itself belongs to the model; the scheduler hands block
//! numbers to sequences.
//!
//! Prefix caching (vLLM's scheme): a full block is identified by its 16 tokens and by the
//! content of everything before it, so sequences that start alike (a shared system prompt, the
//! earlier turns of a chat) reuse the blocks already computed instead of recomputing them.
//! Only full blocks are shared, and a sequence writes only past its shared prefix, so a shared
//! block is never written. A released block keeps its content until the pool needs it again,
//! least recently released first. Contents are matched by their tokens, not by a hash of
//! them, so no crafted prompt can collide with another's prefix.
use super::BLOCK_TOKENS;
use std::collections::{BTreeMap, HashMap};

/// What a full block holds: the id of the content before it (0 at the start) and its tokens.
type Key = (u64, [u32; BLOCK_TOKENS]);

pub struct BlockPool {
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Blocks no sequence holds, by when they were released (oldest first), so the least
    /// recently used cached content is the first overwritten.
    free: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    caching: bool,
    /// Cached contents: the block holding each, and the content's id (never reused, so a key
    /// naming an overwritten block's id can no longer match anything).
    cached: HashMap<Key, (u32, u64)>,
    key_of: Vec<Option<Key>>,
    next_id: u64,
}

impl BlockPool {
    pub fn new(blocks: usize, caching: bool) -> Self {
        let mut pool = Self {
            refs: vec![0; blocks],
            free: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            caching,
            cached: HashMap::new(),
            key_of: vec![None; blocks],
            next_id: 1,
        };
        // Lowest numbers first, so a lone sequence fills the pool from its start.
        for b in 0..blocks as u32 {
            pool.free_block(b);
        }
        pool
    }

    /// Blocks that can be taken: free ones, cached or not.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    fn free_block(&mut self, block: u32) {
        self.clock += 1;
        self.released_at[block as usize] = self.clock;
        self.free.insert(self.clock, block);
    }

    /// Appends `n` blocks to `table`, or takes none and returns false when fewer are free.
    /// Cached contents in the blocks taken are forgotten.
    pub fn take(&mut self, n: usize, table: &mut Vec<u32>) -> bool {
        if n > self.free.len() {
            return false;
        }
        for _ in 0..n {
            let (_, block) = self.free.pop_first().expect("counted above");
            if let Some(key) = self.key_of[block as usize].take() {
                self.cached.remove(&key);
            }
            self.refs[block as usize] = 1;
            table.push(block);
        }
        true
    }

    /// Gives back every block of `table`; a block no other sequence holds becomes free.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for block in table.drain(..) {
            let refs = &mut self.refs[block as usize];
            *refs -= 1;
            if *refs == 0 {
                self.free_block(block);
            }
        }
    }

    /// Appends to `table` the cached blocks that hold the leading full blocks of `tokens`, at
    /// most `max_blocks` of them, and holds them for the caller. Returns how many, and the id of
    /// the content they end with (to pass to `register` for the blocks after them).
    pub fn reuse(
        &mut self,
        tokens: &[u32],
        max_blocks: usize,
        table: &mut Vec<u32>,
    ) -> (usize, u64) {
        let mut id = 0;
        if !self.caching {
            return (0, id);
        }
        let mut n = 0;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS).take(max_blocks) {
            let key = (id, chunk.try_into().expect("a whole block"));
            let Some(&(block, content)) = self.cached.get(&key) else {
                break;
            };
            if self.refs[block as usize] == 0 {
                self.free.remove(&self.released_at[block as usize]);
            }
            self.refs[block as usize] += 1;
            table.push(block);
            id = content;
            n += 1;
        }
        (n, id)
    }

    /// Records that `block` now holds the full block `tokens` following content `parent`, and
    /// returns the id of that content. When another block already holds it, that one stays
    /// the cached copy and its id is returned: the contents are the same.
    pub fn register(&mut self, parent: u64, tokens: &[u32], block: u32) -> u64 {
        if !self.caching {
            return 0;
        }
        let key = (parent, tokens.try_into().expect("a whole block"));
        if let Some(&(_, id)) = self.cached.get(&key) {
            return id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.cached.insert(key, (block, id));
        self.key_of[block as usize] = Some(key);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(first: u32) -> Vec<u32> {
        (first..first + BLOCK_TOKENS as u32).collect()
    }

    #[test]
    fn blocks_are_taken_whole_or_not_at_all_and_come_back() {
        let mut pool = BlockPool::new(4, true);
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

    /// A prefix is found by its whole history: the same tokens after a different block are a
    /// different content.
    #[test]
    fn cached_prefixes_are_reused_by_content_and_held() {
        let mut pool = BlockPool::new(8, true);
        let mut a = Vec::new();
        pool.take(3, &mut a);
        let id0 = pool.register(0, &block(0), a[0]);
        let id1 = pool.register(id0, &block(16), a[1]);
        let prompt: Vec<u32> = [block(0), block(16), block(32)].concat();

        let mut b = Vec::new();
        assert_eq!(pool.reuse(&prompt, 8, &mut b), (2, id1));
        assert_eq!(b, a[..2]);
        let mut c = Vec::new();
        assert_eq!(
            pool.reuse(&prompt, 1, &mut c),
            (1, id0),
            "at most max_blocks"
        );
        let mut d = Vec::new();
        let other: Vec<u32> = [block(100), block(16)].concat();
        assert_eq!(pool.reuse(&other, 8, &mut d), (0, 0));

        // Held by a, b and c: releasing a and b frees nothing that c still holds.
        let free = pool.available();
        pool.release(&mut a);
        pool.release(&mut b);
        assert_eq!(pool.available(), free + 2, "a's third block and block 1");
        pool.release(&mut c);
        assert_eq!(pool.available(), free + 3);
    }

    /// A released block keeps its content until the pool needs it, the least recently
    /// released first; once overwritten, neither it nor anything chained after it matches.
    #[test]
    fn released_contents_live_until_their_block_is_needed() {
        let mut pool = BlockPool::new(3, true);
        let mut a = Vec::new();
        pool.take(2, &mut a);
        let id0 = pool.register(0, &block(0), a[0]);
        pool.register(id0, &block(16), a[1]);
        let prompt: Vec<u32> = [block(0), block(16)].concat();
        pool.release(&mut a);

        let mut b = Vec::new();
        assert_eq!(
            pool.reuse(&prompt, 8, &mut b).0,
            2,
            "still cached after release"
        );
        pool.release(&mut b);

        // The never-used block goes first, then the least recently released (block 0).
        let mut c = Vec::new();
        pool.take(2, &mut c);
        assert_eq!(c, [2, 0]);
        let mut d = Vec::new();
        assert_eq!(pool.reuse(&prompt, 8, &mut d), (0, 0));
        // New content in block 0 does not revive the old chain through the old id.
        pool.register(0, &block(50), c[1]);
        assert_eq!(pool.reuse(&block(0), 8, &mut d), (0, 0));
    }

    #[test]
    fn nothing_is_shared_with_caching_off() {
        let mut pool = BlockPool::new(2, false);
        let mut a = Vec::new();
        pool.take(1, &mut a);
        assert_eq!(pool.register(0, &block(0), a[0]), 0);
        let mut b = Vec::new();
        assert_eq!(pool.reuse(&block(0), 8, &mut b), (0, 0));
        assert!(b.is_empty());
    }
}
