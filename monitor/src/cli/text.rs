//! Text that comes from other processes (comm, cmdline, exe, host, owner and
//! package names) made safe to print on a terminal.
//!
//! Any local process picks its own name and command line, and a package or a
//! DNS answer can carry bytes a terminal acts on: `\x1b]0;...\x07` retitles
//! the window, other sequences move the cursor or rewrite what is already on
//! screen. Every plain-text rendering of such a field goes through
//! [`escape`]; JSON output does not need it (serde escapes controls).

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every character a terminal could act on written as an escape:
/// `\n`, `\r`, `\t`, other C0 controls, DEL and C1 controls as `\xNN`, bidi
/// and line-separator controls as `\u{NNNN}`, and `\` itself as `\\` (so a
/// name cannot pretend to hold an escape). Printable UTF-8 is kept as is.
pub(crate) fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_control(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if is_invisible_format(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `escape` for an optional field, empty when absent.
pub(crate) fn escape_opt(s: Option<&str>) -> Cow<'_, str> {
    s.map(escape).unwrap_or_default()
}

fn needs_escape(c: char) -> bool {
    c == '\\' || is_control(c) || is_invisible_format(c)
}

/// C0, DEL and C1: `char::is_control` is exactly Unicode's Cc category.
fn is_control(c: char) -> bool {
    c.is_control()
}

/// Characters that reorder or break the line around them without showing
/// themselves, so what is printed is not what the name holds.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// Writes `out` to stdout; a closed pipe (`egressmon owners | head`) is not
/// an error.
pub(crate) fn print(out: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_sequences_are_shown_not_acted_on() {
        assert_eq!(escape("\x1b]0;pwned\x07"), "\\x1b]0;pwned\\x07");
        assert_eq!(escape("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape("\0\x7f\u{9b}"), "\\x00\\x7f\\x9b");
        assert_eq!(escape("x\u{202e}gpj.exe"), "x\\u{202e}gpj.exe");
        assert_eq!(escape("C:\\x1b"), "C:\\\\x1b");
    }

    #[test]
    fn printable_text_is_kept_and_not_copied() {
        for s in [
            "com.example.app",
            "système",
            "日本語",
            "curl -s https://a.b/c?d=e",
            "",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s}");
        }
        assert_eq!(escape_opt(None), "");
        assert_eq!(escape_opt(Some("a\x1bb")), "a\\x1bb");
    }

    #[test]
    fn escaped_text_has_no_control_left() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let shown = escape(&all);
        assert!(!shown
            .chars()
            .any(|c| c.is_control() || is_invisible_format(c)));
    }

    /// A flow whose owner and sender name try to retitle the terminal.
    fn hostile_flow() -> crate::pipeline::flows::FlowRecord {
        serde_json::from_value(serde_json::json!({
            "uid": 10123, "user": 0, "app_id": 10123,
            "owner": "\x1b]0;pwned\x07", "packages": ["com.example.app"],
            "origin": "app", "firmware": false, "comm": "\x1b[2Jcurl",
            "proto": "tcp", "family": "ipv4", "dst": "203.0.113.7", "port": 443,
            "connects": 1, "udp_sends": 0, "tx_packets": 1, "tx_bytes": 100,
            "payload": "unknown"
        }))
        .unwrap()
    }

    const SHOWN_OWNER: &str = r"\x1b]0;pwned\x07";

    fn assert_clean(what: &str, out: &str) {
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{what} prints a control character: {out:?}"
        );
        assert!(out.contains(SHOWN_OWNER), "{what}: {out}");
    }

    #[test]
    fn flows_text_and_top_once_show_names_escaped() {
        let flows = [hostile_flow()];
        assert_clean("flows", &crate::pipeline::flows::render_text(&flows));
        assert_clean(
            "top --once",
            &crate::cli::top::render_plain(&crate::cli::top::group(&flows)),
        );
    }

    #[test]
    fn the_live_table_shows_names_escaped() {
        use ratatui::backend::TestBackend;
        use ratatui::crossterm::event::KeyCode;
        let mut view = crate::cli::tui::View::new();
        view.update(
            vec![hostile_flow()],
            &Default::default(),
            std::time::Duration::from_secs(1),
        );
        view.key(KeyCode::Enter);
        let mut terminal = ratatui::Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let cells = terminal.backend().buffer().content();
        let screen: String = cells.iter().map(|c| c.symbol()).collect();
        assert_clean("top", &screen);
        // The expanded flow names its sender, escaped too.
        assert!(screen.contains(r"tcp \x1b[2J"), "{screen}");
    }
}
