//! Bearer tokens: operator tokens for the REST API, `/debug` and the state page, proxy tokens for the
//! snapshot stream, address reports and network checks, and viewer tokens, which may read (GET) what an
//! operator token may read and write nothing: for Prometheus and dashboards. A browser may give an operator token as a Basic
//! password; seed 000 and 002 clients send theirs as `X-API-Token`.
//!
//! Tokens come from files or the environment at start, never from the database. With no token of a
//! role configured, that role's endpoints are open; the binary allows that only on a loopback address.

use std::fmt;

use axum::http::HeaderMap;

/// Who a request may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Operator,
    Proxy,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or one that is nobody's.
    Unauthenticated,
    /// 403: a valid token of the other role.
    Forbidden,
}

/// The configured tokens. Debug output never shows them.
#[derive(Clone, Default)]
pub struct Tokens {
    operator: Vec<String>,
    proxy: Vec<String>,
    viewer: Vec<String>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("operator", &format_args!("{} token(s)", self.operator.len()))
            .field("proxy", &format_args!("{} token(s)", self.proxy.len()))
            .field("viewer", &format_args!("{} token(s)", self.viewer.len()))
            .finish()
    }
}

impl Tokens {
    /// Empty strings are dropped (an empty token would let anyone in).
    pub fn new(operator: Vec<String>, proxy: Vec<String>) -> Self {
        let clean = |tokens: Vec<String>| -> Vec<String> {
            tokens.into_iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
        };
        Self { operator: clean(operator), proxy: clean(proxy), viewer: Vec::new() }
    }

    /// Adds viewer tokens (empty strings dropped, as for the others).
    pub fn with_viewers(mut self, viewer: Vec<String>) -> Self {
        self.viewer = viewer.into_iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        self
    }

    /// Checks a request to an operator endpoint: operator tokens may do anything; viewer tokens may
    /// read (`read_only`: GET, HEAD) and are refused (403) anything else.
    pub fn check_operator(&self, headers: &HeaderMap, read_only: bool) -> Result<(), Denied> {
        match self.check(headers, Role::Operator) {
            Err(Denied::Unauthenticated) if !self.viewer.is_empty() => {
                let presented = presented(headers).ok_or(Denied::Unauthenticated)?;
                let viewer =
                    self.viewer.iter().any(|token| same_secret(token.as_bytes(), presented.as_bytes()));
                match (viewer, read_only) {
                    (true, true) => Ok(()),
                    (true, false) => Err(Denied::Forbidden),
                    (false, _) => Err(Denied::Unauthenticated),
                }
            }
            other => other,
        }
    }

    pub fn requires(&self, role: Role) -> bool {
        !self.of(role).is_empty()
    }

    fn of(&self, role: Role) -> &[String] {
        match role {
            Role::Operator => &self.operator,
            Role::Proxy => &self.proxy,
        }
    }

    /// Checks the request's token for `role`: from `Authorization` (Bearer, or Basic with the token as
    /// the password), else from `X-API-Token` (seed 000's and 002's header).
    pub fn check(&self, headers: &HeaderMap, role: Role) -> Result<(), Denied> {
        if !self.requires(role) {
            return Ok(());
        }
        let presented = presented(headers).ok_or(Denied::Unauthenticated)?;
        let presented = presented.as_str();
        let matches = |tokens: &[String]| {
            tokens.iter().any(|token| same_secret(token.as_bytes(), presented.as_bytes()))
        };
        if matches(self.of(role)) {
            return Ok(());
        }
        let other = match role {
            Role::Operator => Role::Proxy,
            Role::Proxy => Role::Operator,
        };
        if matches(self.of(other)) { Err(Denied::Forbidden) } else { Err(Denied::Unauthenticated) }
    }
}

/// The token a request presents: from `Authorization`, else from `X-API-Token`.
fn presented(headers: &HeaderMap) -> Option<String> {
    let header = |name| headers.get(name).and_then(|value: &axum::http::HeaderValue| value.to_str().ok());
    header(axum::http::header::AUTHORIZATION.as_str())
        .and_then(presented_token)
        .or_else(|| header("x-api-token").map(|token| token.trim().to_string()))
}

/// The token in an `Authorization` header: `Bearer <token>`, or `Basic` with the token as the password
/// (any user name), which is what a browser sends for the state page after its login prompt.
fn presented_token(value: &str) -> Option<String> {
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string());
    }
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = data_encoding::BASE64.decode(encoded.as_bytes()).ok()?;
    let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some(password.to_string())
}

/// Compares in constant time, so response timing says nothing about how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        headers
    }

    #[test]
    fn roles() {
        let tokens = Tokens::new(vec!["op".into(), " ".into()], vec!["px".into()]);
        assert_eq!(tokens.check(&bearer("op"), Role::Operator), Ok(()));
        assert_eq!(tokens.check(&bearer("px"), Role::Operator), Err(Denied::Forbidden));
        assert_eq!(tokens.check(&bearer("nope"), Role::Operator), Err(Denied::Unauthenticated));
        assert_eq!(tokens.check(&HeaderMap::new(), Role::Proxy), Err(Denied::Unauthenticated));
        assert_eq!(tokens.check(&bearer(""), Role::Operator), Err(Denied::Unauthenticated));
        assert_eq!(Tokens::default().check(&HeaderMap::new(), Role::Operator), Ok(()));
        assert!(!format!("{tokens:?}").contains("op\""));
        let mut basic = HeaderMap::new();
        // "admin:op", as a browser sends it after the login prompt.
        basic.insert("authorization", HeaderValue::from_static("Basic YWRtaW46b3A="));
        assert_eq!(tokens.check(&basic, Role::Operator), Ok(()));
        basic.insert("authorization", HeaderValue::from_static("Basic YWRtaW46bm9wZQ=="));
        assert_eq!(tokens.check(&basic, Role::Operator), Err(Denied::Unauthenticated));
        let mut api_token = HeaderMap::new();
        api_token.insert("x-api-token", HeaderValue::from_static("px"));
        assert_eq!(tokens.check(&api_token, Role::Proxy), Ok(()));
        assert_eq!(tokens.check(&api_token, Role::Operator), Err(Denied::Forbidden));
    }
}
