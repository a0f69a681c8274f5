//! Branch names: `backshift/<task-id>-<slug>`, where the slug is a short,
//! readable, git-safe digest of the prompt.

use crate::TaskId;

const MAX_SLUG: usize = 32;

/// A git-safe slug of at most 32 characters from free text: lowercase
/// ASCII letters and digits joined by single dashes.
pub fn slugify(text: &str) -> String {
    let mut slug = String::new();
    let mut pending_dash = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            if pending_dash && !slug.is_empty() {
                if slug.len() + 1 >= MAX_SLUG {
                    break;
                }
                slug.push('-');
            }
            pending_dash = false;
            if slug.len() >= MAX_SLUG {
                break;
            }
            slug.push(c.to_ascii_lowercase());
        } else {
            pending_dash = true;
        }
    }
    if slug.is_empty() {
        slug.push_str("task");
    }
    slug
}

/// The branch of attempt `n` of a task: `backshift/<id>-<slug>`, with
/// `-2`, `-3`... for later attempts.
pub fn branch_name(task: &TaskId, prompt: &str, n: u32) -> String {
    let base = format!("backshift/{task}-{}", slugify(prompt));
    if n <= 1 { base } else { format!("{base}-{n}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_short_lowercase_and_dash_separated() {
        assert_eq!(
            slugify("Fix the flaky login test!"),
            "fix-the-flaky-login-test"
        );
        assert_eq!(slugify("  --weird__spacing  "), "weird-spacing");
        assert_eq!(slugify("日本語"), "task");
        let long = slugify(&"word ".repeat(40));
        assert!(long.len() <= MAX_SLUG, "{long}");
        assert!(!long.ends_with('-'));
    }

    #[test]
    fn branch_names_number_later_attempts() {
        let t = TaskId::parse("k3f9x2m1").unwrap();
        assert_eq!(
            branch_name(&t, "Add hello", 1),
            "backshift/k3f9x2m1-add-hello"
        );
        assert_eq!(
            branch_name(&t, "Add hello", 2),
            "backshift/k3f9x2m1-add-hello-2"
        );
    }
}
