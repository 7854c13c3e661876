//! Accelerator choice.
//!
//! KVM is used only when the CPU advertises hardware virtualisation (vmx or
//! svm in /proc/cpuinfo) and /dev/kvm can be opened. On machines where
//! /dev/kvm exists without vmx/svm (a paravirtual backend), ordinary guests
//! hang under KVM, so TCG is chosen there.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The accelerator to use on this host.
    pub fn detect() -> Accel {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::choose(
            &cpuinfo,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
        )
    }

    /// The decision, separated from the probing so it can be tested.
    pub fn choose(cpuinfo: &str, kvm_opens: bool) -> Accel {
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw && kvm_opens {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "unknown accelerator {other:?} (expected kvm or tcg)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_only_with_hardware_support_and_device() {
        assert_eq!(Accel::choose("flags\t: fpu vmx sse", true), Accel::Kvm);
        assert_eq!(Accel::choose("flags\t: fpu svm sse", true), Accel::Kvm);
        assert_eq!(Accel::choose("flags\t: fpu vmx sse", false), Accel::Tcg);
        // /dev/kvm present but no vmx/svm: the paravirtual case that hangs.
        assert_eq!(
            Accel::choose("flags\t: fpu sse hypervisor", true),
            Accel::Tcg
        );
        assert_eq!(
            Accel::choose("model name : vmx-like cpu\nflags: fpu", true),
            Accel::Tcg
        );
    }
}
