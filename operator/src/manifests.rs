//! Reads SerfHandler manifests from YAML files and directories (several documents per file;
//! documents of other kinds are ignored).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serf_operator_crds::SerfHandler;

/// A manifest that could not be read, with the file and document it came from.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A document is not YAML, or a SerfHandler document does not fit the schema.
    #[error("{path}, document {doc}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based document number.
        doc: usize,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

/// Reads every SerfHandler from `paths` (files, or directories whose `*.yaml` / `*.yml`
/// files are read in name order, recursively). A handler without a namespace gets `default`.
///
/// # Errors
/// The first file that cannot be read or holds an invalid SerfHandler document.
pub fn load_handlers(paths: &[PathBuf]) -> Result<Vec<SerfHandler>, ManifestError> {
    let mut out = Vec::new();
    for path in paths {
        for file in expand(path)? {
            let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Io {
                path: file.clone(),
                source,
            })?;
            out.extend(parse_handlers(&text, &file)?);
        }
    }
    Ok(out)
}

fn expand(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let mut files = Vec::new();
    for p in entries {
        if p.is_dir() {
            files.extend(expand(&p)?);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(p);
        }
    }
    Ok(files)
}

/// Parses the SerfHandlers in one YAML text of one or more documents.
///
/// # Errors
/// A document that is not YAML, or a SerfHandler that does not fit the schema.
pub fn parse_handlers(text: &str, path: &Path) -> Result<Vec<SerfHandler>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let invalid = |message: String| ManifestError::Invalid {
            path: path.to_path_buf(),
            doc: i + 1,
            message,
        };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| invalid(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta =
            serde_yaml::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
        if meta.kind != "SerfHandler" || !meta.api_version.starts_with("serf.operator.io/") {
            continue;
        }
        let mut h: SerfHandler =
            serde_yaml::from_value(value).map_err(|e| invalid(format!("SerfHandler: {e}")))?;
        h.metadata.namespace.get_or_insert_with(|| "default".into());
        out.push(h);
    }
    Ok(out)
}
