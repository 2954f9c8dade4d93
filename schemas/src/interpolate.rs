//! `${VAR}` and `${VAR:-default}` interpolation in scalar values, and the [`Environment`] it reads.
//!
//! Interpolation runs on parsed scalars, not on the raw text, so a variable's value can never inject YAML
//! structure, and positions in error messages stay those of the file. `$$` writes a literal `$`.

use std::borrow::Cow;
use std::collections::HashMap;

/// What a config may read from outside itself: environment variables and secret files. The proxy passes
/// the real process environment; tests pass a [`MapEnvironment`], so no test mutates the process.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    /// Reads a whole file (a secret), or says why it could not.
    fn read_file(&self, path: &str) -> Result<String, String>;
}

/// An [`Environment`] held in memory.
#[derive(Clone, Debug, Default)]
pub struct MapEnvironment {
    pub vars: HashMap<String, String>,
    pub files: HashMap<String, String>,
}

impl MapEnvironment {
    pub fn with_var(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    pub fn with_file(mut self, path: &str, contents: &str) -> Self {
        self.files.insert(path.into(), contents.into());
        self
    }
}

impl Environment for MapEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    fn read_file(&self, path: &str) -> Result<String, String> {
        self.files.get(path).cloned().ok_or_else(|| "No such file or directory".to_string())
    }
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `${VAR}`, `${VAR:-default}` and `$$` in `text`. A variable that is unset, with no default, is
/// an error; `:-` also applies the default when the variable is set but empty, as in a shell.
pub fn interpolate<'a>(text: &'a str, env: &dyn Environment) -> Result<Cow<'a, str>, String> {
    if !text.contains('$') {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text:?}: write $$ for a literal $"))?;
            let expression = &after[..close];
            let (name, default) = match expression.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expression, None),
            };
            if !is_var_name(name) {
                return Err(format!(
                    "invalid variable name {name:?} in ${{{expression}}}: use letters, digits and _"
                ));
            }
            match (env.var(name), default) {
                (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                    ));
                }
            }
            rest = &after[close + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_variables_defaults_and_escapes() {
        let env = MapEnvironment::default().with_var("PORT", "8080").with_var("EMPTY", "");
        let cases = [
            ("plain", "plain"),
            ("127.0.0.1:${PORT}", "127.0.0.1:8080"),
            ("${MISSING:-9000}", "9000"),
            ("${EMPTY:-fallback}", "fallback"),
            ("${EMPTY}", ""),
            ("cost $$5 and $x", "cost $5 and $x"),
            ("${PORT}${PORT}", "80808080"),
        ];
        for (input, expected) in cases {
            assert_eq!(interpolate(input, &env).unwrap(), expected, "{input}");
        }
    }

    #[test]
    fn rejects_unset_bad_names_and_unclosed() {
        let env = MapEnvironment::default();
        let unset = interpolate("${NOPE}", &env).unwrap_err();
        assert!(unset.contains("NOPE is not set"), "{unset}");
        assert!(interpolate("${1BAD}", &env).unwrap_err().contains("invalid variable name"));
        assert!(interpolate("${OPEN", &env).unwrap_err().contains("unclosed"));
    }
}
