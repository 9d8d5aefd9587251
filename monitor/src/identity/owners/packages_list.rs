//! /data/system/packages.list: the package -> uid list the package manager
//! writes for native code (installd, run-as, libpackagelistparser).
//!
//! One package per line, fields separated by single spaces, in the order of
//! the package manager's `writePackageListLPrInternal`:
//!
//! | # | field                  | since        |
//! |---|------------------------|--------------|
//! | 1 | package name           | always       |
//! | 2 | uid (user 0's)         | always       |
//! | 3 | debuggable (0/1)       | always       |
//! | 4 | data directory         | always       |
//! | 5 | SELinux seinfo         | Android 4.4  |
//! | 6 | gids (`a,b,c`/`none`)  | Android 5    |
//! | 7 | profileable from shell | Android 10   |
//! | 8 | long version code      | Android 10   |
//! | 9 | profileable            | Android 12   |
//! | 10| installer (`@system`, `@product`, `@null` or a package) | Android 13 |
//!
//! Older releases simply stop earlier; fields past the tenth, from a newer
//! release, are ignored. Several packages may name the same uid (they share
//! it through `android:sharedUserId`).

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListEntry {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) debuggable: bool,
    pub(crate) data_dir: String,
    pub(crate) seinfo: Option<String>,
    pub(crate) gids: Vec<u32>,
    pub(crate) profileable_from_shell: Option<bool>,
    pub(crate) version_code: Option<i64>,
    pub(crate) profileable: Option<bool>,
    pub(crate) installer: Option<String>,
}

impl ListEntry {
    /// `@system` and `@product` mark packages that came with the system or
    /// product image. Only a last resort: packages.xml's code path is better
    /// evidence, and older releases do not write the field.
    pub(crate) fn installed_with_image(&self) -> Option<bool> {
        self.installer
            .as_deref()
            .map(|i| matches!(i, "@system" | "@product"))
    }
}

/// A package name as the package manager accepts it: dot-separated
/// segments of letters, digits and underscores.
pub(crate) fn valid_package_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|seg| {
            !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn flag(field: &str, what: &str) -> Result<bool, String> {
    match field {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(format!("{what} should be 0 or 1, found {other:?}")),
    }
}

/// Parses one line; the error says which field is wrong.
pub(crate) fn parse_line(line: &str) -> Result<ListEntry, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 4 {
        return Err(format!(
            "expected at least 4 space-separated fields (name uid debuggable data-dir), found {}",
            f.len()
        ));
    }
    if !valid_package_name(f[0]) {
        return Err(format!("{:?} is not a package name", f[0]));
    }
    let uid = f[1]
        .parse::<u32>()
        .map_err(|_| format!("uid should be a number, found {:?}", f[1]))?;
    let gids = match f.get(5) {
        None | Some(&"none") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|g| g.parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!("gids should be `none` or numbers separated by commas, found {list:?}")
            })?,
    };
    let version_code = f
        .get(7)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| format!("version code should be a number, found {v:?}"))
        })
        .transpose()?;
    Ok(ListEntry {
        name: f[0].to_string(),
        uid,
        debuggable: flag(f[2], "debuggable")?,
        data_dir: f[3].to_string(),
        seinfo: f.get(4).map(|s| s.to_string()),
        gids,
        profileable_from_shell: f
            .get(6)
            .map(|v| flag(v, "profileable-from-shell"))
            .transpose()?,
        version_code,
        profileable: f.get(8).map(|v| flag(v, "profileable")).transpose()?,
        installer: f.get(9).map(|s| s.to_string()),
    })
}

/// Parses the whole file. A malformed line is skipped and reported (file
/// and line number, and what is wrong) in the returned warnings; every other
/// line is used.
pub(crate) fn parse(text: &str, file: &Path) -> (Vec<ListEntry>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(entry) => out.push(entry),
            Err(why) => warnings.push(format!(
                "{}:{}: skipping malformed line ({why}); the other lines are used",
                file.display(),
                i + 1
            )),
        }
    }
    (out, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_line_has_every_field() {
        let e = parse_line(
            "com.example.app 10123 1 /data/user/0/com.example.app default:targetSdkVersion=34 3003,1065 0 4711 1 com.android.vending",
        )
        .unwrap();
        assert_eq!(
            e,
            ListEntry {
                name: "com.example.app".into(),
                uid: 10123,
                debuggable: true,
                data_dir: "/data/user/0/com.example.app".into(),
                seinfo: Some("default:targetSdkVersion=34".into()),
                gids: vec![3003, 1065],
                profileable_from_shell: Some(false),
                version_code: Some(4711),
                profileable: Some(true),
                installer: Some("com.android.vending".into()),
            }
        );
        assert_eq!(e.installed_with_image(), Some(false));
    }

    #[test]
    fn older_and_newer_lines() {
        // Android 4.x: no seinfo, no gids.
        let e = parse_line("com.old 10001 0 /data/data/com.old").unwrap();
        assert_eq!((e.seinfo, e.gids, e.installer), (None, vec![], None));
        // Android 9: seinfo and gids.
        let e = parse_line("com.nine 10002 0 /data/user/0/com.nine platform:privapp none").unwrap();
        assert_eq!(e.seinfo.as_deref(), Some("platform:privapp"));
        assert!(e.gids.is_empty());
        assert_eq!(e.installed_with_image(), None);
        // Android 10/11: profileable-from-shell and version code.
        let e = parse_line("com.ten 10003 0 /data/user/0/com.ten default 3003 1 29").unwrap();
        assert_eq!(
            (e.profileable_from_shell, e.version_code),
            (Some(true), Some(29))
        );
        // A future release adding an eleventh field still parses.
        let e = parse_line("com.next 10004 0 /d default none 0 1 0 @product extra").unwrap();
        assert_eq!(e.installed_with_image(), Some(true));
    }

    #[test]
    fn malformed_lines_are_refused_with_the_reason() {
        for (line, reason) in [
            ("com.example", "at least 4"),
            ("com.example ten 0 /data", "uid should be a number"),
            ("com..bad 10000 0 /data", "not a package name"),
            ("com.x 10000 2 /data", "debuggable"),
            ("com.x 10000 0 /data default 3003,x", "gids"),
            ("com.x 10000 0 /data default none 0 v1", "version code"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(reason), "{line:?}: {err}");
        }
    }

    #[test]
    fn a_malformed_line_leaves_the_rest() {
        let (list, warnings) = parse(
            "a.b 10010 0 /data/user/0/a.b default none 0 1 0 @system\n\
             \n\
             garbage\n\
             c.d 10010 0 /data/user/0/c.d default none 0 1 0 @system\n",
            Path::new("packages.list"),
        );
        let names: Vec<_> = list.iter().map(|e| (e.name.as_str(), e.uid)).collect();
        assert_eq!(names, [("a.b", 10010), ("c.d", 10010)]);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .starts_with("packages.list:3: skipping malformed line (expected at least 4"),
            "{warnings:?}"
        );
    }
}
