//! The names of psleak's ETW sessions. A session outlives the process that started it if that
//! process is killed (and the system has room for 64 only), so the name carries its owner's
//! pid: a later psleak stops the sessions whose owner is gone.

const PREFIX: &str = "psleak-";

/// `psleak-OWNER-KIND-TARGET`: the session of kind `kind` that process `owner` runs on `target`.
pub fn session_name(owner: u32, kind: &str, target: u32) -> String {
    format!("{PREFIX}{owner}-{kind}-{target}")
}

/// The pid of the process that runs the psleak session `name`; None for another's session.
pub fn owner_of(name: &str) -> Option<u32> {
    let (owner, rest) = name.strip_prefix(PREFIX)?.split_once('-')?;
    rest.contains('-').then_some(())?;
    owner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_name_tells_its_owner() {
        let name = session_name(4242, "kernel", 77);
        assert_eq!(name, "psleak-4242-kernel-77");
        assert_eq!(owner_of(&name), Some(4242));
        for foreign in ["NT Kernel Logger", "psleak", "psleak-kernel-77", "psleak-x-kernel-77", "psleak-12"] {
            assert_eq!(owner_of(foreign), None, "{foreign}");
        }
    }
}
