//! Decision trees laid out flat, one array of nodes for a whole forest, walked from each
//! tree's root. How a node decides is the library's (`Split`); the walk is shared. Children
//! are checked to come after their parent when a tree is added, so every walk ends.

/// A split's test of one feature value; the libraries differ in precision, comparison and
/// missing values.
pub trait Split: Copy {
    fn goes_left(&self, value: f64, sets: &CategorySets) -> bool;
}

#[derive(Clone, Copy)]
pub enum Node<S> {
    Leaf(f64),
    Split {
        feature: u32,
        left: u32,
        right: u32,
        split: S,
    },
}

/// Bitsets of categories, one per categorical split.
#[derive(Default)]
pub struct CategorySets {
    words: Vec<u32>,
    /// Each set's words.
    ranges: Vec<(u32, u32)>,
}

/// Categories above this would need bitsets larger than any real model's.
pub const MAX_CATEGORY: u32 = 1 << 20;
/// Words of every category set of a forest together (256 MiB).
const MAX_SET_WORDS: usize = 1 << 26;

impl CategorySets {
    /// A set given as 32-bit words (LightGBM's own form); returns its index.
    pub fn add_words(&mut self, words: &[u32]) -> Result<u32, String> {
        if words.len() > (MAX_CATEGORY / 32) as usize {
            return Err(format!("a category set of {} words", words.len()));
        }
        // Each set costs up to 128 KiB for a few bytes of model file: bound them all.
        if self.words.len() + words.len() > MAX_SET_WORDS {
            return Err(format!(
                "category sets over {} MiB in all",
                (MAX_SET_WORDS * 4) >> 20
            ));
        }
        let start = self.words.len() as u32;
        self.words.extend_from_slice(words);
        self.ranges.push((start, words.len() as u32));
        Ok(self.ranges.len() as u32 - 1)
    }

    /// A set given as its members.
    pub fn add_members(&mut self, members: &[u32]) -> Result<u32, String> {
        let max = members.iter().copied().max().unwrap_or(0);
        if max >= MAX_CATEGORY {
            return Err(format!(
                "category {max} is above the limit of {MAX_CATEGORY}"
            ));
        }
        let mut words = vec![0u32; max as usize / 32 + 1];
        for &c in members {
            words[c as usize / 32] |= 1 << (c % 32);
        }
        self.add_words(&words)
    }

    pub fn contains(&self, set: u32, category: u32) -> bool {
        let (start, len) = self.ranges[set as usize];
        let word = (category / 32) as usize;
        word < len as usize && (self.words[start as usize + word] >> (category % 32)) & 1 == 1
    }
}

pub struct Forest<S> {
    nodes: Vec<Node<S>>,
    /// Where each tree starts in `nodes`.
    roots: Vec<usize>,
    pub sets: CategorySets,
    side_by_side: bool,
}

impl<S: Split> Forest<S> {
    /// `side_by_side`: walk rows `LANES` at a time (see `eval`). Measured on the fixtures
    /// (`scripts/bench tabular`): 1.4x the rows/s on XGBoost's depth-wise trees, whose
    /// walks end together; slower on LightGBM's leaf-wise trees, where the deepest of the
    /// rows' walks sets the pace for all of them.
    pub fn new(side_by_side: bool) -> Self {
        Self {
            nodes: Vec::new(),
            roots: Vec::new(),
            sets: CategorySets::default(),
            side_by_side,
        }
    }

    /// Adds a tree whose nodes number their children within the tree; node 0 is the root.
    pub fn add_tree(&mut self, nodes: Vec<Node<S>>, features: usize) -> Result<(), String> {
        if nodes.is_empty() {
            return Err("a tree without nodes".into());
        }
        for (i, node) in nodes.iter().enumerate() {
            if let Node::Split {
                feature,
                left,
                right,
                ..
            } = *node
            {
                if feature as usize >= features {
                    return Err(format!(
                        "node {i} splits on feature {feature} of {features}"
                    ));
                }
                for child in [left, right] {
                    if child as usize <= i || child as usize >= nodes.len() {
                        return Err(format!(
                            "node {i} has child {child}, outside the tree or before it"
                        ));
                    }
                }
            }
        }
        self.roots.push(self.nodes.len());
        self.nodes.extend(nodes);
        Ok(())
    }

    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Calls `add(row, tree, leaf)` with the leaf each row of `rows` reaches in each tree,
    /// trees in order for each row: whole blocks of `LANES` rows side by side (when the
    /// forest walks so), the rest one at a time.
    pub fn walk(&self, rows: &[f64], features: usize, mut add: impl FnMut(usize, usize, f64)) {
        let n = rows.len() / features;
        let row = |r: usize| &rows[r * features..(r + 1) * features];
        let blocked = if self.side_by_side { n - n % LANES } else { 0 };
        for first in (0..blocked).step_by(LANES) {
            let block: [&[f64]; LANES] = std::array::from_fn(|lane| row(first + lane));
            for tree in 0..self.trees() {
                for (lane, leaf) in self.eval(tree, &block).into_iter().enumerate() {
                    add(first + lane, tree, leaf);
                }
            }
        }
        for r in blocked..n {
            for tree in 0..self.trees() {
                add(r, tree, self.eval_one(tree, row(r)));
            }
        }
    }

    /// The leaf value `row` reaches in tree `tree`.
    #[inline]
    pub fn eval_one(&self, tree: usize, row: &[f64]) -> f64 {
        let nodes = &self.nodes[self.roots[tree]..];
        let mut at = 0;
        loop {
            match nodes[at] {
                Node::Leaf(value) => return value,
                Node::Split {
                    feature,
                    left,
                    right,
                    split,
                } => {
                    let goes_left = split.goes_left(row[feature as usize], &self.sets);
                    at = if goes_left { left } else { right } as usize;
                }
            }
        }
    }

    /// The leaf values `rows` reach in tree `tree`. The rows walk side by side: their walks
    /// are independent, so the CPU overlaps their node loads and branches instead of waiting
    /// on each in turn.
    #[inline]
    pub fn eval(&self, tree: usize, rows: &[&[f64]; LANES]) -> [f64; LANES] {
        let nodes = &self.nodes[self.roots[tree]..];
        let mut at = [0u32; LANES];
        loop {
            let mut moved = false;
            for (at, row) in at.iter_mut().zip(rows) {
                if let Node::Split {
                    feature,
                    left,
                    right,
                    split,
                } = nodes[*at as usize]
                {
                    let goes_left = split.goes_left(row[feature as usize], &self.sets);
                    *at = if goes_left { left } else { right };
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        at.map(|i| match nodes[i as usize] {
            Node::Leaf(value) => value,
            Node::Split { .. } => unreachable!("every walk ends on a leaf"),
        })
    }
}

/// Rows evaluated side by side through each tree.
pub const LANES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy)]
    struct Below(f64);

    impl Split for Below {
        fn goes_left(&self, value: f64, _: &CategorySets) -> bool {
            value < self.0
        }
    }

    fn split(feature: u32, left: u32, right: u32, at: f64) -> Node<Below> {
        Node::Split {
            feature,
            left,
            right,
            split: Below(at),
        }
    }

    #[test]
    fn walks_each_tree_from_its_own_root() {
        // Nine rows: side by side, one block of eight and one row alone; or one at a time.
        let rows: Vec<f64> = (0..9).flat_map(|r| [r as f64 / 10.0, 0.0]).collect();
        let expected: Vec<(usize, usize, f64)> = (0..9)
            .flat_map(|r| [(r, 0, if r < 5 { -1.0 } else { 1.0 }), (r, 1, 7.0)])
            .collect();
        for side_by_side in [true, false] {
            let mut forest = Forest::new(side_by_side);
            let stump = vec![split(0, 1, 2, 0.5), Node::Leaf(-1.0), Node::Leaf(1.0)];
            forest.add_tree(stump, 2).unwrap();
            forest.add_tree(vec![Node::Leaf(7.0)], 2).unwrap();
            let mut leaves = vec![];
            forest.walk(&rows, 2, |row, tree, leaf| leaves.push((row, tree, leaf)));
            leaves.sort_by_key(|&(row, tree, _)| (row, tree));
            assert_eq!(leaves, expected, "side by side: {side_by_side}");
        }
    }

    #[test]
    fn refuses_loops_and_features_out_of_range() {
        let mut forest = Forest::new(true);
        let cycle = vec![split(0, 1, 2, 0.5), split(0, 0, 2, 0.5), Node::Leaf(1.0)];
        assert!(forest.add_tree(cycle, 1).unwrap_err().contains("before it"));
        let wide = vec![split(3, 1, 2, 0.5), Node::Leaf(0.0), Node::Leaf(1.0)];
        assert!(forest.add_tree(wide, 2).unwrap_err().contains("feature 3"));
        assert_eq!(forest.trees(), 0);
    }

    #[test]
    fn category_sets_hold_their_members_only() {
        let mut sets = CategorySets::default();
        let a = sets.add_members(&[1, 33]).unwrap();
        let b = sets.add_words(&[0b100]).unwrap();
        assert!(sets.contains(a, 1) && sets.contains(a, 33));
        assert!(!sets.contains(a, 2) && !sets.contains(a, 1000));
        assert!(sets.contains(b, 2) && !sets.contains(b, 1));
        assert!(sets.add_members(&[MAX_CATEGORY]).is_err());
    }
}
