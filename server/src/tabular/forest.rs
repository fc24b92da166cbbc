//! Decision trees laid out flat, one array of nodes for a whole forest, evaluated feature
//! by feature (`Scorer`) where every tree has at most 64 leaves, else walked from each
//! tree's root. How a node decides is the library's (`Split`); the evaluation is shared.
//! Children are checked to come after their parent when a tree is added, so every walk
//! ends.
use super::scorer::Scorer;

/// A split's test of one feature value; the libraries differ in precision, comparison and
/// missing values.
pub trait Split: Copy {
    fn goes_left(&self, value: f64, sets: &CategorySets) -> bool;

    /// For a split that sends every value but NaN left exactly when `below(value,
    /// threshold)`, that threshold; None for the others.
    fn threshold(&self) -> Option<f64>;

    /// The library's comparison of a value with a threshold: left when true.
    fn below(value: f64, threshold: f64) -> bool;
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
    /// Set by `finish` for forests it can score.
    scorer: Option<Scorer<S>>,
}

impl<S: Split> Forest<S> {
    /// `side_by_side`: where the forest is walked, walk rows `LANES` at a time (see
    /// `eval`). Measured on the fixtures, walked: 1.4x the rows/s on XGBoost's depth-wise
    /// trees, whose walks end together; slower on LightGBM's leaf-wise trees, where the
    /// deepest of the rows' walks sets the pace for all of them. Scored, the fixtures run
    /// 1.4x (LightGBM) and 1.6x (XGBoost) the rows/s of their walks (256 rows, one thread).
    pub fn new(side_by_side: bool) -> Self {
        Self {
            nodes: Vec::new(),
            roots: Vec::new(),
            sets: CategorySets::default(),
            side_by_side,
            scorer: None,
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

    /// Prepares the forest's evaluation once its last tree is added: scored feature by
    /// feature (`Scorer`) where every tree allows it, walked tree by tree otherwise.
    pub fn finish(&mut self, features: usize) {
        self.scorer = Scorer::build(&self.nodes, &self.roots, features, &self.sets);
    }

    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Calls `leaves(row, values)` for each row of `rows` with the leaf value it reaches in
    /// each tree, trees in order: for the caller to sum where it keeps them in registers
    /// (adding each leaf to memory in turn chains every add on the store before it).
    pub fn walk(&self, rows: &[f64], features: usize, mut leaves: impl FnMut(usize, &[f64])) {
        if let Some(scorer) = &self.scorer {
            return scorer.walk(rows, features, &self.sets, leaves);
        }
        let n = rows.len() / features;
        let trees = self.trees();
        let row = |r: usize| &rows[r * features..(r + 1) * features];
        let mut values = vec![0.0; LANES * trees];
        let blocked = if self.side_by_side { n - n % LANES } else { 0 };
        for first in (0..blocked).step_by(LANES) {
            let block: [&[f64]; LANES] = std::array::from_fn(|lane| row(first + lane));
            for tree in 0..trees {
                for (lane, leaf) in self.eval(tree, &block).into_iter().enumerate() {
                    values[lane * trees + tree] = leaf;
                }
            }
            for lane in 0..LANES {
                leaves(first + lane, &values[lane * trees..][..trees]);
            }
        }
        for r in blocked..n {
            for (tree, value) in values[..trees].iter_mut().enumerate() {
                *value = self.eval_one(tree, row(r));
            }
            leaves(r, &values[..trees]);
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

        fn threshold(&self) -> Option<f64> {
            Some(self.0)
        }

        fn below(value: f64, threshold: f64) -> bool {
            value < threshold
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
            forest.walk(&rows, 2, |row, values| {
                leaves.extend(
                    values
                        .iter()
                        .enumerate()
                        .map(|(tree, &leaf)| (row, tree, leaf)),
                )
            });
            leaves.sort_by_key(|&(row, tree, _)| (row, tree));
            assert_eq!(leaves, expected, "side by side: {side_by_side}");
        }
    }

    /// A split like the libraries': a threshold with its own way for NaN, or a set.
    #[derive(Clone, Copy, Debug)]
    enum Mixed {
        Below { at: f64, nan_left: bool },
        Member { set: u32 },
    }

    impl Split for Mixed {
        fn goes_left(&self, value: f64, sets: &CategorySets) -> bool {
            match *self {
                Mixed::Below { nan_left, .. } if value.is_nan() => nan_left,
                Mixed::Below { at, .. } => value < at,
                Mixed::Member { set } => value >= 0.0 && sets.contains(set, value as u32),
            }
        }

        fn threshold(&self) -> Option<f64> {
            match *self {
                Mixed::Below { at, .. } => Some(at),
                Mixed::Member { .. } => None,
            }
        }

        fn below(value: f64, threshold: f64) -> bool {
            value < threshold
        }
    }

    /// A tree of `leaves` leaves and random splits, its nodes after `nodes`' first.
    fn grow(next: &mut impl FnMut() -> u64, nodes: &mut Vec<Node<Mixed>>, leaves: u64) -> u32 {
        const VALUES: [f64; 6] = [-1.0, 0.0, 0.5, 1.0, 2.0, f64::NAN];
        let at = nodes.len();
        nodes.push(Node::Leaf((next() % 1000) as f64));
        if leaves > 1 {
            let split = match next() % 4 {
                0 => Mixed::Member {
                    set: (next() % 2) as u32,
                },
                _ => Mixed::Below {
                    at: VALUES[(next() % 6) as usize],
                    nan_left: next().is_multiple_of(2),
                },
            };
            let on_left = 1 + next() % (leaves - 1);
            let left = grow(next, nodes, on_left);
            let right = grow(next, nodes, leaves - on_left);
            nodes[at] = Node::Split {
                feature: (next() % 3) as u32,
                left,
                right,
                split,
            };
        }
        at as u32
    }

    proptest::proptest! {
        /// Scoring feature by feature reaches the leaves walking each tree does, on values
        /// equal to thresholds, NaNs and categories included; trees over 64 leaves walk.
        #[test]
        fn scoring_reaches_the_leaves_walking_does(seed: u64, side_by_side: bool) {
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let (mut walked, mut scored) = (Forest::new(side_by_side), Forest::new(side_by_side));
            let most = if next().is_multiple_of(4) { 80 } else { 64 };
            for forest in [&mut walked, &mut scored] {
                forest.sets.add_members(&[0, 2]).unwrap();
                forest.sets.add_members(&[1, 40]).unwrap();
            }
            for _ in 0..1 + next() % 6 {
                let mut nodes = Vec::new();
                let leaves = 1 + next() % most;
                grow(&mut next, &mut nodes, leaves);
                walked.add_tree(nodes.clone(), 3).unwrap();
                scored.add_tree(nodes, 3).unwrap();
            }
            scored.finish(3);
            let widest = scored.roots.iter().enumerate().map(|(tree, &root)| {
                let end = scored.roots.get(tree + 1).copied().unwrap_or(scored.nodes.len());
                scored.nodes[root..end].iter().filter(|n| matches!(n, Node::Leaf(_))).count()
            });
            proptest::prop_assert_eq!(scored.scorer.is_some(), widest.max().unwrap() <= 64);
            const VALUES: [f64; 8] = [-1.0, 0.0, 0.25, 0.5, 1.0, 2.0, 40.0, f64::NAN];
            let rows: Vec<f64> = (0..3 * 19).map(|_| VALUES[(next() % 8) as usize]).collect();
            let leaves = |forest: &Forest<Mixed>| {
                let mut out = Vec::new();
                forest.walk(&rows, 3, |row, values| out.push((row, values.to_vec())));
                out
            };
            proptest::prop_assert_eq!(leaves(&walked), leaves(&scored));
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
