//! The package mirrors this machine's apt sources name: the mirrors a server allows by
//! default, so that on a Debian machine the run command builds from the mirror the
//! machine itself installs from, with no host name written anywhere.

use std::path::Path;

/// Every `deb` URI in `dir`'s `sources.list` and `sources.list.d/*.list` (one-line form)
/// and `sources.list.d/*.sources` (deb822), in the order apt reads them, without
/// duplicates. Files apt would skip (another suffix, `Enabled: no`) are skipped.
pub fn apt_mirrors(dir: &Path) -> Vec<String> {
    let mut files = vec![dir.join("sources.list")];
    if let Ok(entries) = std::fs::read_dir(dir.join("sources.list.d")) {
        let mut more: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut mirrors = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822(&text),
            Some("list") => one_line(&text),
            _ => continue,
        };
        for uri in found {
            if !mirrors.contains(&uri) {
                mirrors.push(uri);
            }
        }
    }
    mirrors
}

fn one_line(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            if words.next() != Some("deb") {
                return None;
            }
            let mut uri = words.next()?;
            // `deb [arch=amd64 signed-by=…] URI …`: options may hold spaces inside brackets.
            if uri.starts_with('[') {
                let mut rest = words.skip_while(|w| !w.ends_with(']'));
                rest.next()?;
                uri = rest.next()?;
            }
            Some(uri.to_owned())
        })
        .collect()
}

fn deb822(text: &str) -> Vec<String> {
    let mut uris = Vec::new();
    for stanza in text.split("\n\n") {
        let mut is_deb = false;
        let mut enabled = true;
        let mut found = Vec::new();
        for line in stanza.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => is_deb = value.split_whitespace().any(|t| t == "deb"),
                "uris" => found = value.split_whitespace().map(str::to_owned).collect(),
                "enabled" => enabled = !value.trim().eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        if is_deb && enabled {
            uris.extend(found);
        }
    }
    uris
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_are_read_and_what_apt_skips_is_skipped() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("sources.list"),
            "# a comment\ndeb http://one.example/debian bookworm main\n\
             deb-src http://src.example/debian bookworm main\n\
             deb [arch=amd64 signed-by=/k.gpg] http://two.example/debian bookworm main\n",
        )
        .expect("write");
        std::fs::create_dir(dir.path().join("sources.list.d")).expect("mkdir");
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\n# a comment\nURIs: http://three.example/debian\nSuites: bookworm\n\n\
             Types: deb\nURIs: http://off.example/debian\nEnabled: no\n\n\
             Types: deb deb-src\nURIs: http://one.example/debian http://four.example/x\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("sources.list.d/other.list.disabled"),
            "deb http://skipped.example/ x main\n",
        )
        .expect("write");
        assert_eq!(
            apt_mirrors(dir.path()),
            [
                "http://one.example/debian",
                "http://two.example/debian",
                "http://three.example/debian",
                "http://four.example/x"
            ]
        );
    }
}
