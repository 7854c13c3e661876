//! The one rule for every name in spore: images, disks, VMs, templates,
//! groups, networks and certificates, wherever it comes from (CLI, API,
//! peer routes). Names become file names, NBD export names and parts of
//! QEMU arguments, so only characters safe in all of them pass.

/// The rule, as errors say it.
pub const NAME_RULE: &str = "1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -";

/// Whether `name` follows [`NAME_RULE`].
pub fn is_valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a `kind` name (`"image"`, `"vm"`, ...) against [`NAME_RULE`]; the
/// error says the rule.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{kind} name {name:?} is invalid: names are {NAME_RULE}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in ["a", "web-1", "v1.2_x", "A.b-c_D", &"x".repeat(128)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "a b",
            "a,b",
            "a=b",
            "é",
            "a\0",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
            assert!(check_name("vm", bad).unwrap_err().contains(NAME_RULE));
        }
    }
}
