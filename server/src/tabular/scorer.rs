//! Forests evaluated feature by feature instead of tree by tree (QuickScorer: Lucchese et
//! al., SIGIR 2015). Each tree's leaves are numbered left to right and a row starts with
//! every leaf of every tree possible, one bit each. A split that sends the row right rules
//! out its left subtree's leaves; once every split has been tested, the lowest possible leaf
//! of each tree is the one a walk from its root reaches. A feature's plain numeric splits,
//! sorted by threshold, send a value right exactly up to the first that sends it left, so
//! a row visits only the splits it goes right at, in one predictable loop, instead of
//! walking each tree with a mispredicted branch at every other node.
use super::forest::{CategorySets, Node, Split};

/// The most leaves a tree may have for a forest to be scored so (one bit each).
const MAX_LEAVES: usize = 64;

/// A split tested by its own `goes_left`.
#[derive(Clone, Copy)]
struct Test<S> {
    split: S,
    tree: u32,
    /// Every leaf but those of the split's left subtree.
    keep: u64,
}

/// A plain numeric split: left when `Split::below` its threshold.
#[derive(Clone, Copy)]
struct Bound {
    threshold: f64,
    tree: u32,
    /// Where a NaN goes, which no threshold says.
    nan_left: bool,
    keep: u64,
}

pub struct Scorer<S> {
    /// For each feature, its plain numeric splits by rising threshold (`Split::threshold`).
    sorted: Vec<Vec<Bound>>,
    /// For each feature, its other splits, each tested on its own.
    others: Vec<Vec<Test<S>>>,
    /// Every tree's leaf values, left to right, tree after tree.
    leaves: Vec<f64>,
    /// Where each tree's leaves start in `leaves`.
    starts: Vec<usize>,
}

impl<S: Split> Scorer<S> {
    /// The scorer of the trees starting at `roots` in `nodes`, or None when one tree has
    /// more than `MAX_LEAVES` leaves or a node reached twice.
    pub fn build(
        nodes: &[Node<S>],
        roots: &[usize],
        features: usize,
        sets: &CategorySets,
    ) -> Option<Self> {
        let mut scorer = Self {
            sorted: vec![Vec::new(); features],
            others: vec![Vec::new(); features],
            leaves: Vec::new(),
            starts: Vec::with_capacity(roots.len()),
        };
        let ends = roots.iter().skip(1).copied().chain([nodes.len()]);
        for (tree, (&root, end)) in roots.iter().zip(ends).enumerate() {
            scorer.add_tree(&nodes[root..end], tree as u32, sets)?;
        }
        for bounds in &mut scorer.sorted {
            bounds.sort_by(|a, b| a.threshold.total_cmp(&b.threshold));
        }
        Some(scorer)
    }

    fn add_tree(&mut self, nodes: &[Node<S>], tree: u32, sets: &CategorySets) -> Option<()> {
        // Depth first from the root, left before right: leaves come in left-to-right order.
        let mut order = Vec::with_capacity(nodes.len());
        let mut seen = vec![false; nodes.len()];
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                return None;
            }
            order.push(i);
            if let Node::Split { left, right, .. } = nodes[i] {
                stack.extend([right as usize, left as usize]);
            }
        }
        // Each node's leaves, as a range of leaf numbers: children before their parents.
        let mut ranges = vec![(0u32, 0u32); nodes.len()];
        let mut leaf_values = Vec::new();
        for &i in &order {
            if let Node::Leaf(value) = nodes[i] {
                ranges[i] = (leaf_values.len() as u32, leaf_values.len() as u32 + 1);
                leaf_values.push(value);
            }
        }
        if leaf_values.len() > MAX_LEAVES {
            return None;
        }
        for &i in order.iter().rev() {
            if let Node::Split {
                feature,
                left,
                right,
                split,
            } = nodes[i]
            {
                let (lo, hi) = ranges[left as usize];
                ranges[i] = (lo, ranges[right as usize].1);
                let ruled_out = (u64::MAX >> (64 - (hi - lo))) << lo;
                let (feature, keep) = (feature as usize, !ruled_out);
                // A NaN threshold has no place in the order: no value goes left at it.
                match split.threshold().filter(|t| !t.is_nan()) {
                    Some(threshold) => self.sorted[feature].push(Bound {
                        threshold,
                        tree,
                        nan_left: split.goes_left(f64::NAN, sets),
                        keep,
                    }),
                    None => self.others[feature].push(Test { split, tree, keep }),
                }
            }
        }
        self.starts.push(self.leaves.len());
        self.leaves.extend(leaf_values);
        Some(())
    }

    /// `Forest::walk`, scored.
    pub fn walk(
        &self,
        rows: &[f64],
        features: usize,
        sets: &CategorySets,
        mut leaves: impl FnMut(usize, &[f64]),
    ) {
        let mut possible = vec![u64::MAX; self.starts.len()];
        let mut values = vec![0.0; self.starts.len()];
        for (r, row) in rows.chunks_exact(features).enumerate() {
            possible.fill(u64::MAX);
            for ((&value, sorted), others) in row.iter().zip(&self.sorted).zip(&self.others) {
                if value.is_nan() {
                    // A NaN's direction is each split's own: no order to rely on.
                    for b in sorted.iter().filter(|b| !b.nan_left) {
                        possible[b.tree as usize] &= b.keep;
                    }
                } else {
                    for b in sorted {
                        if S::below(value, b.threshold) {
                            break;
                        }
                        possible[b.tree as usize] &= b.keep;
                    }
                }
                for t in others {
                    if !t.split.goes_left(value, sets) {
                        possible[t.tree as usize] &= t.keep;
                    }
                }
            }
            for ((value, &start), bits) in values.iter_mut().zip(&self.starts).zip(&possible) {
                *value = self.leaves[start + bits.trailing_zeros() as usize];
            }
            leaves(r, &values);
        }
    }
}
