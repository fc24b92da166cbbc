//! Which files of a repository a model needs: weights in the formats kandle loads, the
//! configs and tokenizer, sentence-transformers module configs; never ONNX, TF, Flax or
//! images. `--include` replaces the choice; `--exclude` removes from it.
use globset::{Glob, GlobSet, GlobSetBuilder};

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("invalid glob `{0}`: {1}")]
    Glob(String, globset::Error),
    #[error("no file matched; the repository has: {0}")]
    Nothing(String),
    #[error(
        "the repository has no model kandle loads: safetensors or GGUF weights, or an XGBoost (.json, .ubj) or LightGBM (.txt) model; kandle loads no .bin, .pt or pickle files"
    )]
    NoWeights,
    #[error(
        "the repository has {0} GGUF files; choose one with --include, e.g. --include '*Q4_K_M.gguf'"
    )]
    ManyGguf(usize),
}

pub fn globs(patterns: &[String]) -> Result<Option<GlobSet>, SelectError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        builder.add(Glob::new(p).map_err(|e| SelectError::Glob(p.clone(), e))?);
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| SelectError::Glob(patterns.join(","), e))
}

fn is_support_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let top_level = !path.contains('/');
    // sentence-transformers modules live in folders such as `1_Pooling/`.
    let st_module = path.split_once('/').is_some_and(|(dir, rest)| {
        dir.split_once('_')
            .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
            && !rest.contains('/')
    });
    (top_level || st_module) && (name.ends_with(".json") || name.ends_with(".jinja"))
        || top_level && matches!(name, "tokenizer.model" | "vocab.txt" | "merges.txt")
}

pub fn select(
    files: &[String],
    include: Option<&GlobSet>,
    exclude: Option<&GlobSet>,
) -> Result<Vec<String>, SelectError> {
    let chosen: Vec<String> = match include {
        Some(set) => files
            .iter()
            .filter(|f| set.is_match(f.as_str()))
            .cloned()
            .collect(),
        None => {
            let safetensors: Vec<&String> = files
                .iter()
                .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
                .collect();
            let gguf: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
            let weights: Vec<&String> = if !safetensors.is_empty() {
                safetensors
            } else if gguf.len() == 1 {
                gguf
            } else if gguf.len() > 1 {
                return Err(SelectError::ManyGguf(gguf.len()));
            } else {
                // A tabular model: its file beside the manifest; the loader tells which. A
                // config.json means a language model whose weights kandle does not load.
                let tabular: Vec<&String> = files
                    .iter()
                    .filter(|f| {
                        !f.contains('/') && [".json", ".ubj", ".txt"].iter().any(|e| f.ends_with(e))
                    })
                    .collect();
                if tabular.is_empty() || files.iter().any(|f| f == "config.json") {
                    return Err(SelectError::NoWeights);
                }
                tabular
            };
            files
                .iter()
                .filter(|f| weights.contains(f) || is_support_file(f))
                .cloned()
                .collect()
        }
    };
    let chosen: Vec<String> = chosen
        .into_iter()
        .filter(|f| exclude.is_none_or(|set| !set.is_match(f.as_str())))
        .collect();
    if chosen.is_empty() {
        return Err(SelectError::Nothing(files.join(", ")));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_tabular_repository_gets_its_model_files_and_never_its_pickles() {
        let files = names(&[
            "README.md",
            "model.ubj",
            "kandle-tabular.json",
            "model.joblib",
            "notebooks/train.txt",
        ]);
        assert_eq!(
            select(&files, None, None).unwrap(),
            names(&["model.ubj", "kandle-tabular.json"])
        );
        let pickled = names(&["README.md", "model.pkl"]);
        assert!(matches!(
            select(&pickled, None, None),
            Err(SelectError::NoWeights)
        ));
    }

    #[test]
    fn picks_safetensors_configs_and_pooling_only() {
        let files = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "onnx/model.onnx",
            "onnx/config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "modules.json",
            "1_Pooling/config.json",
            "openvino/x.xml",
            "chat_template.jinja",
            "images/logo.png",
        ]);
        let got = select(&files, None, None).unwrap();
        assert_eq!(
            got,
            names(&[
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "vocab.txt",
                "modules.json",
                "1_Pooling/config.json",
                "chat_template.jinja"
            ])
        );
    }

    #[test]
    fn gguf_repositories_need_a_choice_when_they_hold_several() {
        let one = names(&["README.md", "m.Q4_0.gguf"]);
        assert_eq!(select(&one, None, None).unwrap(), names(&["m.Q4_0.gguf"]));
        let many = names(&["m.Q4_0.gguf", "m.Q8_0.gguf", "config.json"]);
        assert!(matches!(
            select(&many, None, None),
            Err(SelectError::ManyGguf(2))
        ));
        let include = globs(&["*Q8_0.gguf".into()]).unwrap();
        assert_eq!(
            select(&many, include.as_ref(), None).unwrap(),
            names(&["m.Q8_0.gguf"])
        );
        assert!(matches!(
            select(&names(&["pytorch_model.bin", "config.json"]), None, None),
            Err(SelectError::NoWeights)
        ));
    }

    #[test]
    fn exclude_removes_from_the_choice() {
        let files = names(&["config.json", "model.safetensors", "generation_config.json"]);
        let exclude = globs(&["generation_*".into()]).unwrap();
        assert_eq!(
            select(&files, None, exclude.as_ref()).unwrap(),
            names(&["config.json", "model.safetensors"])
        );
    }
}
