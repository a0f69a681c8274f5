//! Egress policy: which network requests leave a sandbox.
//!
//! A rule names a host pattern and, optionally, ports, HTTP methods and a
//! path prefix, with an action: allow, deny or ask. Rules come from the
//! project and from the server (project rules first); every rule that
//! matches a request counts, and **deny wins** over ask, which wins over
//! allow. A request no rule matches gets the policy's default action.
//!
//! A tunnel (`CONNECT`, how HTTPS goes through a proxy) shows only host
//! and port: a rule with methods or a path prefix cannot be checked
//! against it and does not match it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What happens to a request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It goes through.
    Allow,
    /// A person decides; it waits meanwhile (and is denied if nobody does).
    Ask,
    /// It is refused.
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        })
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `example.com` (that host only), `*.example.com` (its subdomains,
    /// not itself), `*` (every host), or an IP address as written in the
    /// request. Case does not matter.
    pub host: String,
    /// Ports it applies to; empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods it applies to (plain HTTP only); empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path prefix it applies to (plain HTTP only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// What to do.
    pub action: Action,
}

/// A request as the proxy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The host as the client wrote it (a name or an IP address, without
    /// brackets).
    pub host: &'a str,
    /// The port.
    pub port: u16,
    /// `None` for a tunnel (`CONNECT`); the method and path of a plain HTTP
    /// request otherwise.
    pub http: Option<(&'a str, &'a str)>,
}

/// Where the deciding rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The project's rules.
    Project,
    /// The server's rules.
    Server,
    /// The server's rules for the setup phase (`postCreateCommand`).
    Setup,
    /// An approval a person gave earlier (for the task or the project).
    Approval,
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What happens.
    pub action: Action,
    /// The rule that decided it, as text (`deny *.example.com:443 (project
    /// rule 2)`); `None` when no rule matched and the default applied.
    pub rule: Option<String>,
}

/// Whether `pattern` names `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(domain) => host.len() > domain.len() + 1 && host.ends_with(&format!(".{domain}")),
        None => pattern == host,
    }
}

impl Rule {
    /// Whether this rule applies to `req`.
    pub fn matches(&self, req: &Request<'_>) -> bool {
        if !host_matches(&self.host, req.host) {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return false;
        }
        let narrowed = !self.methods.is_empty() || self.path_prefix.is_some();
        match req.http {
            None => !narrowed,
            Some((method, path)) => {
                (self.methods.is_empty()
                    || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
                    && self
                        .path_prefix
                        .as_deref()
                        .is_none_or(|p| path.starts_with(p))
            }
        }
    }

    /// A one-line description (`allow *.example.com:443 GET /api`).
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.action, self.host);
        if !self.ports.is_empty() {
            let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
            s.push(':');
            s.push_str(&ports.join(","));
        }
        if !self.methods.is_empty() {
            s.push(' ');
            s.push_str(&self.methods.join(","));
        }
        if let Some(p) = &self.path_prefix {
            s.push(' ');
            s.push_str(p);
            s.push('*');
        }
        s
    }

    /// What is wrong with this rule, if anything.
    pub fn check(&self) -> Result<(), String> {
        let host = self.host.trim();
        if host.is_empty() {
            return Err("a rule's host is empty; use `*` for every host".into());
        }
        if host != "*" && host.strip_prefix("*.").unwrap_or(host).contains('*') {
            return Err(format!(
                "host pattern `{host}` is not supported: use `name`, `*.domain` or `*`"
            ));
        }
        if let Some(p) = &self.path_prefix
            && !p.starts_with('/')
        {
            return Err(format!("path prefix `{p}` must start with `/`"));
        }
        if self.ports.contains(&0) {
            return Err("port 0 is not a port".into());
        }
        Ok(())
    }
}

/// Decides `req` by `sets` (each a list of rules and where it came from);
/// deny beats ask beats allow among all the rules that match, and
/// `default` applies when none does.
pub fn evaluate(sets: &[(Origin, &[Rule])], default: Action, req: &Request<'_>) -> Decision {
    let mut best: Option<(Action, String)> = None;
    for (origin, rules) in sets {
        for (i, rule) in rules.iter().enumerate() {
            if !rule.matches(req) {
                continue;
            }
            let better = best.as_ref().is_none_or(|(a, _)| rule.action > *a);
            if better {
                let from = match origin {
                    Origin::Project => format!("project rule {}", i + 1),
                    Origin::Server => format!("server rule {}", i + 1),
                    Origin::Setup => format!("setup rule {}", i + 1),
                    Origin::Approval => "an earlier approval".to_owned(),
                };
                best = Some((rule.action, format!("{} ({from})", rule.describe())));
            }
        }
    }
    match best {
        Some((action, rule)) => Decision {
            action,
            rule: Some(rule),
        },
        None => Decision {
            action: default,
            rule: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, action: Action) -> Rule {
        Rule {
            host: host.into(),
            ports: vec![],
            methods: vec![],
            path_prefix: None,
            action,
        }
    }

    fn tunnel(host: &str, port: u16) -> Request<'_> {
        Request {
            host,
            port,
            http: None,
        }
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("example.com", "EXAMPLE.com."));
        assert!(!host_matches("example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(host_matches("*", "anything.invalid"));
        assert!(host_matches("10.0.0.1", "10.0.0.1"));
        assert!(!host_matches("10.0.0.1", "10.0.0.1.evil.invalid"));
    }

    #[test]
    fn deny_wins_then_ask_then_allow() {
        let project = [rule("*.example.com", Action::Allow)];
        let server = [
            rule("secret.example.com", Action::Deny),
            rule("*", Action::Ask),
        ];
        let sets = [
            (Origin::Project, &project[..]),
            (Origin::Server, &server[..]),
        ];
        let d = evaluate(&sets, Action::Deny, &tunnel("secret.example.com", 443));
        assert_eq!(d.action, Action::Deny);
        assert_eq!(
            d.rule.as_deref(),
            Some("deny secret.example.com (server rule 1)")
        );
        let d = evaluate(&sets, Action::Deny, &tunnel("api.example.com", 443));
        assert_eq!(d.action, Action::Ask, "ask beats allow: {d:?}");
        let d = evaluate(
            &[(Origin::Project, &project[..])],
            Action::Deny,
            &tunnel("api.example.com", 443),
        );
        assert_eq!(d.action, Action::Allow);
        let d = evaluate(
            &[(Origin::Project, &project[..])],
            Action::Deny,
            &tunnel("other.org", 443),
        );
        assert_eq!(
            d,
            Decision {
                action: Action::Deny,
                rule: None
            }
        );
    }

    #[test]
    fn ports_methods_and_paths() {
        let r = Rule {
            host: "pypi.example".into(),
            ports: vec![80],
            methods: vec!["GET".into()],
            path_prefix: Some("/simple/".into()),
            action: Action::Allow,
        };
        let get = |path| Request {
            host: "pypi.example",
            port: 80,
            http: Some(("get", path)),
        };
        assert!(r.matches(&get("/simple/requests/")));
        assert!(!r.matches(&get("/upload")));
        assert!(!r.matches(&Request {
            http: Some(("POST", "/simple/")),
            ..get("/")
        }));
        assert!(!r.matches(&Request {
            port: 8080,
            ..get("/simple/")
        }));
        // A tunnel hides method and path: a narrowed rule cannot vouch for it.
        assert!(!r.matches(&tunnel("pypi.example", 80)));
        assert_eq!(r.describe(), "allow pypi.example:80 GET /simple/*");
        let plain = Rule {
            ports: vec![443],
            ..rule("pypi.example", Action::Deny)
        };
        assert!(plain.matches(&tunnel("pypi.example", 443)));
        assert!(plain.matches(&Request {
            port: 443,
            ..get("/anything")
        }));
    }

    #[test]
    fn bad_rules_are_explained() {
        assert!(rule("", Action::Allow).check().is_err());
        assert!(rule("a*.example.com", Action::Allow).check().is_err());
        assert!(rule("*.*.example.com", Action::Allow).check().is_err());
        assert!(rule("*.example.com", Action::Allow).check().is_ok());
        let r = Rule {
            path_prefix: Some("api".into()),
            ..rule("x", Action::Allow)
        };
        assert!(r.check().unwrap_err().contains("must start with `/`"));
        let r = Rule {
            ports: vec![0],
            ..rule("x", Action::Allow)
        };
        assert!(r.check().is_err());
    }
}
