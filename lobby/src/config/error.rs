//! What is wrong with a configuration file, each problem with its place.
use std::{fmt, path::PathBuf};

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the whole file (it cannot be read).
    pub line: usize,
    /// 1-based, in characters; 0 when `line` is 0.
    pub column: usize,
    /// Where in the document, e.g.
    /// `lb[0].targets[1].upstream_group.upstreams[2].health_check.probe.timeout`;
    /// empty for problems of the document as a whole (syntax, empty file).
    pub path: String,
    /// What was found and what was expected.
    pub message: String,
}

/// `FILE:LINE:COL: PATH: MESSAGE`, leaving out the parts that are unknown.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, " {}:", self.path)?;
        }
        write!(f, " {}", self.message)
    }
}

/// Every problem found in one configuration file, in document order; never
/// empty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// Sorts by position so that the report reads top to bottom.
    pub(crate) fn new(mut errors: Vec<ConfigError>) -> Self {
        errors.sort_by_key(|e| (e.line, e.column));
        ConfigErrors { errors }
    }

    /// The one error of a document that cannot be read, or not as YAML.
    pub(crate) fn of_document(
        file: &std::path::Path,
        line: usize,
        column: usize,
        message: String,
    ) -> Self {
        ConfigErrors::new(vec![ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            path: String::new(),
            message,
        }])
    }

    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }
}

/// One error a line.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
