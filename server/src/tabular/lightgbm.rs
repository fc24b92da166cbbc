//! LightGBM text models (`save_model`), evaluated as LightGBM does: in f64, numbers
//! compared with `<=` against thresholds written with 17 digits, missing values by each
//! node's missing type, categories through the node's bitset.
use super::forest::{CategorySets, Forest, Node, Split};
use super::{Kind, Schema, TabularModel};
use std::collections::HashMap;

/// Below this magnitude a value counts as zero (LightGBM's `kZeroThreshold`).
const ZERO: f64 = 1e-35_f32 as f64;

#[derive(Debug, Clone, Copy)]
enum Link {
    Identity,
    /// `sigmoid:K`: 1 / (1 + exp(-K x)).
    Sigmoid(f64),
    Softmax,
    Exp,
}

pub struct LightGbm {
    schema: Schema,
    forest: Forest<LgbSplit>,
    /// Trees added to each output in turn.
    per_iteration: usize,
    link: Link,
}

/// A split, with its missing-value handling resolved at load: LightGBM reads a NaN as 0
/// unless the node's missing type is NaN, and sends a missing value (NaN, or a zero when
/// the missing type is Zero) down the node's default branch.
#[derive(Clone, Copy)]
struct LgbSplit {
    threshold: f64,
    /// The category set, for categorical splits.
    set: u32,
    categorical: bool,
    /// Values within `ZERO` of zero are missing.
    zero_missing: bool,
    default_left: bool,
    /// Where a NaN goes.
    nan_left: bool,
}

impl Split for LgbSplit {
    #[inline]
    fn goes_left(&self, value: f64, sets: &CategorySets) -> bool {
        if value.is_nan() {
            self.nan_left
        } else if self.categorical {
            // LightGBM truncates to an int: -0.5 is category 0, below -1 none (right).
            value > -1.0 && sets.contains(self.set, value as u32)
        } else if self.zero_missing && (-ZERO..=ZERO).contains(&value) {
            self.default_left
        } else {
            Self::below(value, self.threshold)
        }
    }

    fn threshold(&self) -> Option<f64> {
        (!self.categorical && !self.zero_missing).then_some(self.threshold)
    }

    #[inline]
    fn below(value: f64, threshold: f64) -> bool {
        value <= threshold
    }
}

impl LightGbm {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (header, rest) = text
            .split_once("\nTree=")
            .ok_or("no trees (a LightGBM model has `Tree=` sections)")?;
        let header = fields(header);
        let get = |key: &str| header.get(key).copied().ok_or(format!("no `{key}=` line"));
        let features = number::<usize>(get("max_feature_idx")?, "max_feature_idx")? + 1;
        let num_class = number::<usize>(get("num_class")?, "num_class")?;
        let per_iteration =
            number::<usize>(get("num_tree_per_iteration")?, "num_tree_per_iteration")?;
        let (kind, link) = objective(get("objective")?, num_class)?;
        if per_iteration != kind.groups() {
            return Err(format!(
                "{per_iteration} trees per iteration for {} outputs",
                kind.groups()
            ));
        }
        if header.contains_key("average_output") {
            return Err("random forest models (average_output) are not supported".into());
        }
        let trees = rest
            .split_once("\nend of trees")
            .ok_or("no `end of trees` line")?
            .0;
        // Leaf-wise trees: one row at a time (see `Forest::new`).
        let mut forest = Forest::new(false);
        for (i, section) in trees.split("\nTree=").enumerate() {
            add_tree(&mut forest, &fields(section), features)
                .map_err(|e| format!("tree {i}: {e}"))?;
        }
        forest.finish(features);
        let mut names: Vec<String> = header
            .get("feature_names")
            .map(|s| s.split(' ').map(String::from).collect())
            .unwrap_or_default();
        if names.len() != features {
            names = (0..features).map(|i| format!("Column_{i}")).collect();
        }
        Ok(Self {
            schema: Schema {
                format: "lightgbm",
                features: names,
                kind,
            },
            forest,
            per_iteration,
            link,
        })
    }
}

/// A section's `key=value` lines.
fn fields(section: &str) -> HashMap<&str, &str> {
    section.lines().filter_map(|l| l.split_once('=')).collect()
}

fn number<T: std::str::FromStr>(s: &str, field: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{field} `{s}` is not a number"))
}

fn list<T: std::str::FromStr>(
    fields: &HashMap<&str, &str>,
    key: &str,
    n: usize,
) -> Result<Vec<T>, String> {
    let values = fields
        .get(key)
        .ok_or_else(|| format!("no `{key}=` line"))?
        .split(' ')
        .map(|s| number(s, key))
        .collect::<Result<Vec<T>, _>>()?;
    if values.len() != n {
        return Err(format!("`{key}` has {} values, not {n}", values.len()));
    }
    Ok(values)
}

/// `objective=NAME [key:value ...]`.
fn objective(line: &str, num_class: usize) -> Result<(Kind, Link), String> {
    let mut words = line.split(' ');
    let name = words.next().unwrap_or_default();
    let options: HashMap<&str, &str> = words.filter_map(|w| w.split_once(':')).collect();
    if options.contains_key("sqrt") || line.split(' ').any(|w| w == "sqrt") {
        return Err("regression with reg_sqrt is not supported".into());
    }
    let sigmoid = || number::<f64>(options.get("sigmoid").copied().unwrap_or("1"), "sigmoid");
    Ok(match name {
        "binary" => (Kind::Classifier { classes: 2 }, Link::Sigmoid(sigmoid()?)),
        "multiclass" if num_class >= 2 => (Kind::Classifier { classes: num_class }, Link::Softmax),
        "multiclassova" if num_class >= 2 => {
            // Each class scored on its own, as LightGBM leaves them (not summing to 1).
            (
                Kind::Classifier { classes: num_class },
                Link::Sigmoid(sigmoid()?),
            )
        }
        "cross_entropy" | "xentropy" => (Kind::Regressor, Link::Sigmoid(1.0)),
        "regression" | "regression_l1" | "huber" | "fair" | "quantile" | "mape" | "lambdarank"
        | "rank_xendcg" => (Kind::Regressor, Link::Identity),
        "poisson" | "gamma" | "tweedie" => (Kind::Regressor, Link::Exp),
        other => return Err(format!("objective `{other}` is not supported")),
    })
}

fn add_tree(
    forest: &mut Forest<LgbSplit>,
    tree: &HashMap<&str, &str>,
    features: usize,
) -> Result<(), String> {
    let leaves = number::<usize>(
        tree.get("num_leaves").ok_or("no `num_leaves=`")?,
        "num_leaves",
    )?;
    if tree.get("is_linear").is_some_and(|v| v.trim() != "0") {
        return Err("linear trees are not supported".into());
    }
    // Bounded by the text: each leaf value takes at least two characters.
    let leaf_text = tree.get("leaf_value").ok_or("no `leaf_value=`")?;
    if leaves == 0 || leaves > leaf_text.len() {
        return Err(format!(
            "num_leaves {leaves} does not match its leaf values"
        ));
    }
    let leaf_values: Vec<f64> = list(tree, "leaf_value", leaves)?;
    if leaves == 1 {
        return forest.add_tree(vec![Node::Leaf(leaf_values[0])], features);
    }
    let splits = leaves - 1;
    let feature: Vec<u32> = list(tree, "split_feature", splits)?;
    let threshold: Vec<f64> = list(tree, "threshold", splits)?;
    let decision: Vec<u8> = list(tree, "decision_type", splits)?;
    let left: Vec<i64> = list(tree, "left_child", splits)?;
    let right: Vec<i64> = list(tree, "right_child", splits)?;
    let cats = categories(forest, tree)?;
    // Internal nodes first, then the leaves: a child `c < 0` is leaf `!c`.
    let child = |c: i64| -> Result<u32, String> {
        let index = if c < 0 { splits as i64 + !c } else { c };
        u32::try_from(index)
            .ok()
            .filter(|&i| (i as usize) < splits + leaves)
            .ok_or_else(|| format!("child {c} is outside the tree"))
    };
    let mut nodes = Vec::with_capacity(splits + leaves);
    for i in 0..splits {
        let d = decision[i];
        let (categorical, default_left) = (d & 1 == 1, d & 2 == 2);
        // Missing type: 0 none, 1 zero, 2 NaN.
        let missing = (d >> 2) & 3;
        let set = if categorical {
            let k = threshold[i] as usize;
            *cats
                .get(k)
                .ok_or_else(|| format!("node {i} names category set {k}"))?
        } else {
            0
        };
        let zero_missing = missing == 1;
        let nan_left = match missing {
            _ if categorical => false,
            2 => default_left,
            // A NaN is read as 0, itself missing when zeros are.
            1 => default_left,
            _ => 0.0 <= threshold[i],
        };
        nodes.push(Node::Split {
            feature: feature[i],
            left: child(left[i])?,
            right: child(right[i])?,
            split: LgbSplit {
                threshold: threshold[i],
                set,
                categorical,
                zero_missing,
                default_left,
                nan_left,
            },
        });
    }
    nodes.extend(leaf_values.into_iter().map(Node::Leaf));
    forest.add_tree(nodes, features)
}

/// The tree's category bitsets (`cat_boundaries` into `cat_threshold`), added to the forest.
fn categories(
    forest: &mut Forest<LgbSplit>,
    tree: &HashMap<&str, &str>,
) -> Result<Vec<u32>, String> {
    let n = number::<usize>(tree.get("num_cat").copied().unwrap_or("0"), "num_cat")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let text = tree.get("cat_boundaries").ok_or("no `cat_boundaries=`")?;
    if n >= text.len() {
        return Err(format!("num_cat {n} does not match its boundaries"));
    }
    let bounds: Vec<usize> = list(tree, "cat_boundaries", n + 1)?;
    let words: Vec<u32> = tree
        .get("cat_threshold")
        .ok_or("no `cat_threshold=`")?
        .split(' ')
        .map(|s| number(s, "cat_threshold"))
        .collect::<Result<_, _>>()?;
    bounds
        .windows(2)
        .map(|w| {
            let range = words
                .get(w[0]..w[1])
                .ok_or("cat_boundaries outside cat_threshold")?;
            forest.sets.add_words(range)
        })
        .collect()
}

impl TabularModel for LightGbm {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<(), String> {
        let features = self.schema.features.len();
        let groups = self.per_iteration;
        let mut raw = vec![0f64; rows.len() / features * groups];
        self.forest.walk(rows, features, |row, leaves| {
            for (group, raw) in raw[row * groups..][..groups].iter_mut().enumerate() {
                // In tree order, as LightGBM sums.
                *raw = (leaves.iter().skip(group).step_by(groups)).fold(0.0, |sum, l| sum + l);
            }
        });
        let outputs = self.schema.kind.outputs();
        for (raw, out) in raw.chunks_exact(groups).zip(out.chunks_exact_mut(outputs)) {
            self.link(raw, out);
        }
        Ok(())
    }
}

impl LightGbm {
    /// Raw scores to outputs, as LightGBM's objectives convert them.
    fn link(&self, raw: &[f64], out: &mut [f64]) {
        match (self.link, self.schema.kind) {
            (Link::Sigmoid(k), Kind::Classifier { .. }) if raw.len() == 1 => {
                let p = 1.0 / (1.0 + (-k * raw[0]).exp());
                out[0] = 1.0 - p;
                out[1] = p;
            }
            (Link::Sigmoid(k), _) => {
                for (o, r) in out.iter_mut().zip(raw) {
                    *o = 1.0 / (1.0 + (-k * r).exp());
                }
            }
            (Link::Softmax, _) => {
                let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for (o, r) in out.iter_mut().zip(raw) {
                    *o = (r - max).exp();
                    sum += *o;
                }
                out.iter_mut().for_each(|o| *o /= sum);
            }
            (Link::Exp, _) => out[0] = raw[0].exp(),
            (Link::Identity, _) => out[0] = raw[0],
        }
    }
}
