//! Secret values never reach the database: every event body, agent
//! message, summary and failure detail written through the store passes
//! through the [`Redactor`], which replaces each known secret value with
//! `[redacted:NAME]`.

use std::borrow::Cow;
use std::sync::RwLock;

/// Values shorter than this are not redacted (they would match
/// everywhere); secrets must be at least this long.
pub const MIN_SECRET_LEN: usize = 6;

/// The secret values to hide, by name.
#[derive(Debug, Default)]
pub struct Redactor {
    secrets: RwLock<Vec<(String, String)>>,
}

impl Redactor {
    /// Replaces the known values (name, value).
    pub fn set(&self, mut secrets: Vec<(String, String)>) {
        secrets.retain(|(_, v)| v.len() >= MIN_SECRET_LEN);
        // Longest first: a value containing another is replaced whole.
        secrets.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        *self.secrets.write().unwrap_or_else(|p| p.into_inner()) = secrets;
    }

    /// Whether there is anything to hide.
    pub fn is_empty(&self) -> bool {
        self.secrets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// `text` with every secret value, as it is and as it appears inside a
    /// JSON string, replaced by `[redacted:NAME]`.
    pub fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let secrets = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        let mut out = Cow::Borrowed(text);
        for (name, value) in secrets.iter() {
            let marker = format!("[redacted:{name}]");
            let escaped = serde_json::to_string(value).unwrap_or_default();
            let escaped = escaped.trim_matches('"');
            for form in [value.as_str(), escaped] {
                if out.contains(form) {
                    out = Cow::Owned(out.replace(form, &marker));
                }
            }
        }
        out
    }

    /// `value` with [`Self::text`] applied to every string in it.
    pub fn json(&self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(s) => {
                if let Cow::Owned(r) = self.text(s) {
                    *s = r;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.json(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.json(v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_replaced_raw_and_json_escaped_and_short_ones_ignored() {
        let r = Redactor::default();
        assert!(r.is_empty());
        r.set(vec![
            ("DB".into(), "pa\"ss-w0rd".into()),
            ("PIN".into(), "1234".into()),
            ("LONG".into(), "pa\"ss-w0rd-and-more".into()),
        ]);
        assert_eq!(r.text("x pa\"ss-w0rd y"), "x [redacted:DB] y");
        assert_eq!(
            r.text(r#"{"t":"pa\"ss-w0rd-and-more"}"#),
            r#"{"t":"[redacted:LONG]"}"#
        );
        assert_eq!(r.text("1234"), "1234", "too short to redact");
        let mut v = serde_json::json!({"a": ["pa\"ss-w0rd"], "n": 1});
        r.json(&mut v);
        assert_eq!(v["a"][0], "[redacted:DB]");
        assert!(matches!(r.text("nothing here"), Cow::Borrowed(_)));
    }
}
