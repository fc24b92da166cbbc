//! XGBoost models saved by `save_model` (`.json`, `.ubj`), evaluated as XGBoost does:
//! features cast to f32 and compared with `<`, sums in f32, a missing value sent down its
//! node's default branch, a category in a node's set sent right and any other left.
use super::forest::{CategorySets, Forest, Node, Split};
use super::{Kind, Schema, TabularModel};
use serde::Deserialize;

#[derive(Debug, Clone, Copy)]
enum Link {
    Identity,
    Sigmoid,
    Softmax,
    Exp,
}

pub struct XgBoost {
    schema: Schema,
    forest: Forest<XgbSplit>,
    /// The trees that add to each output (class), in order.
    trees_of: Vec<Vec<usize>>,
    base_margin: Vec<f32>,
    link: Link,
}

#[derive(Clone, Copy)]
struct XgbSplit {
    /// The threshold, or the category set's index.
    threshold: f32,
    set: u32,
    categorical: bool,
    default_left: bool,
}

impl Split for XgbSplit {
    #[inline]
    fn goes_left(&self, value: f64, sets: &CategorySets) -> bool {
        let value = value as f32;
        if value.is_nan() {
            self.default_left
        } else if !self.categorical {
            Self::below(f64::from(value), f64::from(self.threshold))
        } else {
            // Categories are whole numbers stored as floats; XGBoost truncates them, and
            // sends negative and unseen ones left.
            !(value >= 0.0 && value < u32::MAX as f32 && sets.contains(self.set, value as u32))
        }
    }

    fn threshold(&self) -> Option<f64> {
        (!self.categorical).then_some(f64::from(self.threshold))
    }

    /// In f32, as XGBoost compares (exact for the f32 values both are).
    #[inline]
    fn below(value: f64, threshold: f64) -> bool {
        (value as f32) < threshold as f32
    }
}

#[derive(Deserialize)]
struct File {
    learner: Learner,
}

#[derive(Deserialize)]
struct Learner {
    #[serde(default)]
    feature_names: Vec<String>,
    learner_model_param: ModelParam,
    objective: Objective,
    gradient_booster: Booster,
}

#[derive(Deserialize)]
struct ModelParam {
    base_score: String,
    num_class: String,
    num_feature: String,
    #[serde(default)]
    num_target: Option<String>,
}

#[derive(Deserialize)]
struct Objective {
    name: String,
}

#[derive(Deserialize)]
struct Booster {
    name: String,
    model: Option<Trees>,
}

#[derive(Deserialize)]
struct Trees {
    trees: Vec<Tree>,
    tree_info: Vec<u32>,
}

#[derive(Deserialize)]
struct Tree {
    left_children: Vec<i64>,
    right_children: Vec<i64>,
    split_indices: Vec<u64>,
    split_conditions: Vec<f32>,
    default_left: Vec<Flag>,
    #[serde(default)]
    split_type: Vec<u8>,
    #[serde(default)]
    categories: Vec<i64>,
    #[serde(default)]
    categories_nodes: Vec<u64>,
    #[serde(default)]
    categories_segments: Vec<u64>,
    #[serde(default)]
    categories_sizes: Vec<u64>,
    tree_param: TreeParam,
}

#[derive(Deserialize)]
struct TreeParam {
    #[serde(default)]
    size_leaf_vector: Option<String>,
}

/// XGBoost wrote `default_left` as booleans before 2.0 and as integers since.
#[derive(Deserialize)]
#[serde(untagged)]
enum Flag {
    Bool(bool),
    Int(u8),
}

impl Flag {
    fn is_set(&self) -> bool {
        matches!(self, Self::Bool(true) | Self::Int(1..))
    }
}

impl XgBoost {
    pub fn from_value(value: serde_json::Value) -> Result<Self, String> {
        let file: File = serde_path_to_error::deserialize(value)
            .map_err(|e| format!("not an XGBoost model: {} at {}", e.inner(), e.path()))?;
        let learner = file.learner;
        let param = &learner.learner_model_param;
        let features: usize = number(&param.num_feature, "num_feature")?;
        let num_class: usize = number(&param.num_class, "num_class")?;
        if let Some(t) = &param.num_target
            && number::<usize>(t, "num_target")? > 1
        {
            return Err("multi-target models are not supported".into());
        }
        let (kind, link) = objective(&learner.objective.name, num_class)?;
        if learner.gradient_booster.name != "gbtree" {
            return Err(format!(
                "booster `{}` is not supported, only gbtree",
                learner.gradient_booster.name
            ));
        }
        let trees = learner
            .gradient_booster
            .model
            .ok_or("the gbtree booster has no model")?;
        let outputs = num_class.max(1);
        if trees.tree_info.len() != trees.trees.len()
            || trees.tree_info.iter().any(|&g| g as usize >= outputs)
        {
            return Err("tree_info does not give each tree a class".into());
        }
        // Depth-wise trees: rows side by side (see `Forest::new`).
        let mut forest = Forest::new(true);
        for (i, tree) in trees.trees.iter().enumerate() {
            add_tree(&mut forest, tree, features).map_err(|e| format!("tree {i}: {e}"))?;
        }
        forest.finish(features);
        let base_margin = base_margin(&param.base_score, outputs, link)?;
        let mut names = learner.feature_names;
        if names.len() != features {
            names = (0..features).map(|i| format!("f{i}")).collect();
        }
        Ok(Self {
            schema: Schema {
                format: "xgboost",
                features: names,
                kind,
            },
            forest,
            trees_of: (0..outputs)
                .map(|g| {
                    (0..trees.tree_info.len())
                        .filter(|&t| trees.tree_info[t] as usize == g)
                        .collect()
                })
                .collect(),
            base_margin,
            link,
        })
    }
}

fn number<T: std::str::FromStr>(s: &str, field: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{field} `{s}` is not a number"))
}

fn objective(name: &str, num_class: usize) -> Result<(Kind, Link), String> {
    Ok(match name {
        "binary:logistic" => (Kind::Classifier { classes: 2 }, Link::Sigmoid),
        "multi:softprob" | "multi:softmax" if num_class >= 2 => {
            (Kind::Classifier { classes: num_class }, Link::Softmax)
        }
        "reg:logistic" => (Kind::Regressor, Link::Sigmoid),
        "binary:logitraw"
        | "reg:squarederror"
        | "reg:squaredlogerror"
        | "reg:pseudohubererror"
        | "reg:absoluteerror"
        | "reg:quantileerror"
        | "rank:pairwise"
        | "rank:ndcg"
        | "rank:map" => (Kind::Regressor, Link::Identity),
        "count:poisson" | "reg:gamma" | "reg:tweedie" => (Kind::Regressor, Link::Exp),
        other => return Err(format!("objective `{other}` is not supported")),
    })
}

/// `base_score` is kept as the model's output (a probability for logistic objectives); sums
/// start from it turned back into a margin. XGBoost 2+ writes it in brackets, and 3.1+ one
/// per class, already margins for softmax.
fn base_margin(text: &str, outputs: usize, link: Link) -> Result<Vec<f32>, String> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    let scores = inner
        .split(',')
        .map(|s| number::<f32>(s, "base_score"))
        .collect::<Result<Vec<f32>, _>>()?;
    let margin = |p: f32| match link {
        Link::Sigmoid => -(1.0 / p - 1.0).ln(),
        Link::Exp => p.ln(),
        Link::Identity | Link::Softmax => p,
    };
    match scores.len() {
        1 => Ok(vec![margin(scores[0]); outputs]),
        n if n == outputs => Ok(scores.into_iter().map(margin).collect()),
        n => Err(format!("base_score has {n} values for {outputs} outputs")),
    }
}

fn add_tree(forest: &mut Forest<XgbSplit>, tree: &Tree, features: usize) -> Result<(), String> {
    let n = tree.left_children.len();
    let lengths = [
        tree.right_children.len(),
        tree.split_indices.len(),
        tree.split_conditions.len(),
        tree.default_left.len(),
    ];
    if lengths.iter().any(|&len| len != n)
        || (!tree.split_type.is_empty() && tree.split_type.len() != n)
    {
        return Err("node arrays differ in length".into());
    }
    if let Some(s) = &tree.tree_param.size_leaf_vector
        && number::<usize>(s, "size_leaf_vector")? > 1
    {
        return Err("vector leaves (multi-target trees) are not supported".into());
    }
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        if tree.left_children[i] == -1 {
            nodes.push(Node::Leaf(f64::from(tree.split_conditions[i])));
            continue;
        }
        let categorical = tree.split_type.get(i) == Some(&1);
        let set = if categorical {
            forest.sets.add_members(&categories(tree, i)?)?
        } else {
            0
        };
        nodes.push(Node::Split {
            feature: index(tree.split_indices[i])?,
            left: index(tree.left_children[i])?,
            right: index(tree.right_children[i])?,
            split: XgbSplit {
                threshold: tree.split_conditions[i],
                set,
                categorical,
                default_left: tree.default_left[i].is_set(),
            },
        });
    }
    forest.add_tree(nodes, features)
}

fn index<T: TryInto<u32> + Copy + std::fmt::Display>(v: T) -> Result<u32, String> {
    v.try_into().map_err(|_| format!("index {v} out of range"))
}

/// A categorical node's categories: its segment of the tree's shared list.
fn categories(tree: &Tree, node: usize) -> Result<Vec<u32>, String> {
    let k = tree
        .categories_nodes
        .iter()
        .position(|&n| n == node as u64)
        .ok_or_else(|| format!("categorical node {node} has no categories"))?;
    let range = tree
        .categories_segments
        .get(k)
        .zip(tree.categories_sizes.get(k))
        .and_then(|(&s, &l)| {
            Some(usize::try_from(s).ok()?..usize::try_from(s.checked_add(l)?).ok()?)
        })
        .filter(|r| r.end <= tree.categories.len())
        .ok_or("category segments outside the category list")?;
    tree.categories[range].iter().map(|&c| index(c)).collect()
}

impl TabularModel for XgBoost {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<(), String> {
        let features = self.schema.features.len();
        let groups = self.base_margin.len();
        let mut margins: Vec<f32> = (0..rows.len() / features)
            .flat_map(|_| self.base_margin.iter().copied())
            .collect();
        self.forest.walk(rows, features, |row, leaves| {
            let margins = &mut margins[row * groups..][..groups];
            for (margin, trees) in margins.iter_mut().zip(&self.trees_of) {
                // In tree order, in f32 (leaves are f32 values held exactly in f64).
                *margin = trees.iter().fold(*margin, |sum, &t| sum + leaves[t] as f32);
            }
        });
        let outputs = self.schema.kind.outputs();
        for (margin, out) in margins
            .chunks_exact_mut(groups)
            .zip(out.chunks_exact_mut(outputs))
        {
            self.link_margins(margin, out);
        }
        Ok(())
    }
}

impl XgBoost {
    /// Margins to outputs, in f32 as XGBoost computes them.
    fn link_margins(&self, margin: &mut [f32], out: &mut [f64]) {
        match (self.link, self.schema.kind) {
            (Link::Sigmoid, Kind::Classifier { .. }) => {
                let p = sigmoid(margin[0]);
                out[0] = f64::from(1.0 - p);
                out[1] = f64::from(p);
            }
            (Link::Softmax, _) => {
                let max = margin.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for m in margin.iter_mut() {
                    *m = (*m - max).exp();
                    sum += *m;
                }
                for (o, m) in out.iter_mut().zip(margin.iter()) {
                    *o = f64::from(*m / sum);
                }
            }
            (Link::Sigmoid, _) => out[0] = f64::from(sigmoid(margin[0])),
            (Link::Exp, _) => out[0] = f64::from(margin[0].exp()),
            (Link::Identity, _) => out[0] = f64::from(margin[0]),
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
