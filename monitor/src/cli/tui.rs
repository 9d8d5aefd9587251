//! The live `top` screen (ratatui): owners by traffic, refreshed every
//! second. Keys: ↑/↓ select, Enter expand/collapse an owner's flows,
//! s cycle sort, f firmware only, q quit. Fits an 80x24 adb shell.

use crate::cli::client::Endpoint;
use crate::cli::text::{escape, escape_opt};
use crate::cli::top::{self, OwnerRow};
use crate::pipeline::flows::FlowRecord;
use anyhow::Result;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table, TableState};
use ratatui::Frame;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SortKey {
    Bytes,
    Rate,
    Connects,
    Uid,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Bytes => SortKey::Rate,
            SortKey::Rate => SortKey::Connects,
            SortKey::Connects => SortKey::Uid,
            SortKey::Uid => SortKey::Bytes,
        }
    }
    fn name(self) -> &'static str {
        match self {
            SortKey::Bytes => "total",
            SortKey::Rate => "rate",
            SortKey::Connects => "connections",
            SortKey::Uid => "uid",
        }
    }
}

/// Screen state, independent of the terminal (unit tested).
pub(crate) struct View {
    pub(crate) rows: Vec<OwnerRow>,
    pub(crate) flows: Vec<FlowRecord>,
    pub(crate) sort: SortKey,
    pub(crate) firmware_only: bool,
    pub(crate) expanded: Option<u32>,
    pub(crate) selected: usize,
    pub(crate) error: Option<String>,
    /// Where the agent's own log goes, shown in the footer (set by whoever
    /// started the agent beside this table: see [`AGENT_LOG_ENV`]).
    pub(crate) agent_log: Option<String>,
}

/// Environment variable naming the file the agent's log goes to, so its
/// lines are never drawn over the table (`cargo xtask run` sets it).
pub(crate) const AGENT_LOG_ENV: &str = "EGRESSMON_AGENT_LOG";

impl View {
    pub(crate) fn new() -> View {
        View {
            rows: Vec::new(),
            flows: Vec::new(),
            sort: SortKey::Bytes,
            firmware_only: false,
            expanded: None,
            selected: 0,
            error: None,
            agent_log: None,
        }
    }

    pub(crate) fn visible(&self) -> Vec<&OwnerRow> {
        let mut rows: Vec<&OwnerRow> = self
            .rows
            .iter()
            .filter(|r| !self.firmware_only || r.firmware)
            .collect();
        match self.sort {
            SortKey::Bytes => rows.sort_by_key(|r| std::cmp::Reverse(r.tx_bytes)),
            SortKey::Rate => rows.sort_by(|a, b| b.rate_bps.total_cmp(&a.rate_bps)),
            SortKey::Connects => rows.sort_by_key(|r| std::cmp::Reverse(r.connects)),
            SortKey::Uid => rows.sort_by_key(|r| r.uid),
        }
        // Local traffic apart, after the rest (the sort is stable).
        rows.sort_by_key(|r| r.local);
        rows
    }

    /// Applies one key; returns false to quit.
    pub(crate) fn key(&mut self, code: KeyCode) -> bool {
        let count = self.visible().len();
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('f') => {
                self.firmware_only = !self.firmware_only;
                self.selected = 0;
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(count.saturating_sub(1))
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Enter => {
                let uid = self.visible().get(self.selected).map(|r| r.uid);
                self.expanded = if self.expanded == uid { None } else { uid };
            }
            _ => {}
        }
        true
    }

    pub(crate) fn draw(&self, frame: &mut Frame) {
        let footer_lines = if self.agent_log.is_some() { 2 } else { 1 };
        let [header, body, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(3),
            Constraint::Length(footer_lines),
        ])
        .areas(frame.area());
        let total: u64 = self.rows.iter().map(|r| r.tx_bytes).sum();
        let owners: std::collections::HashSet<u32> = self.rows.iter().map(|r| r.uid).collect();
        let alerts: u64 = self.rows.iter().map(|r| r.alerts).sum();
        let leaking: u64 = self.rows.iter().map(|r| r.leaking_flows).sum();
        let blocked: u64 = self.rows.iter().map(|r| r.blocked).sum();
        let title = format!(
            "egressmon top  owners {}{}{}{}  sent {}  sort: {}{}",
            owners.len(),
            if alerts > 0 {
                format!("  alerts {alerts}")
            } else {
                String::new()
            },
            if leaking > 0 {
                format!("  ID leaks {leaking}")
            } else {
                String::new()
            },
            if blocked > 0 {
                format!("  blocked {blocked}")
            } else {
                String::new()
            },
            top::human_bytes(total as f64),
            self.sort.name(),
            if self.firmware_only {
                "  [firmware only]"
            } else {
                ""
            }
        );
        frame.render_widget(
            Paragraph::new(title).style(Style::default().add_modifier(Modifier::BOLD)),
            header,
        );
        let mut rows = Vec::new();
        for r in self.visible() {
            let style = if r.local {
                Style::default().add_modifier(Modifier::DIM)
            } else if r.alerts > 0 || r.leaking_flows > 0 || r.blocked > 0 {
                Style::default().fg(Color::Red)
            } else {
                Style::default()
            };
            rows.push(
                Row::new(vec![
                    r.uid.to_string(),
                    format!("{}{}", top::alert_mark(r), escape(&r.owner)),
                    // Local rows say so where the origin would be.
                    format!(
                        "{}{}",
                        if r.local {
                            "local".into()
                        } else {
                            escape(&r.origin)
                        },
                        if r.firmware { " FW" } else { "" }
                    ),
                    top::human_bytes(r.rate_bps),
                    top::human_bytes(r.tx_bytes as f64),
                    r.connects.to_string(),
                    r.destinations.to_string(),
                    escape(&r.top_destinations.join(" ")).into_owned(),
                ])
                .style(style),
            );
            if self.expanded == Some(r.uid) {
                for f in self.flows_of(r) {
                    let mut dst = if f.family == "ipv6" {
                        format!("[{}]:{}", f.dst, f.port)
                    } else {
                        format!("{}:{}", f.dst, f.port)
                    };
                    // The count where the origin would be, the rules after
                    // the destination (cut first when space runs out).
                    let mut marker = String::new();
                    if !f.alerts.is_empty() {
                        marker = format!("!{}", f.alerts.len());
                    }
                    if !f.leaks.is_empty() {
                        marker.push_str(" ID");
                    }
                    if f.blocked > 0 {
                        marker.push_str(" BLK");
                    }
                    let notes = top::flow_notes(f);
                    if !notes.is_empty() {
                        dst = format!("{dst} {notes}");
                    }
                    rows.push(
                        Row::new(vec![
                            String::new(),
                            format!("  {} {}", f.proto, escape_opt(f.comm.as_deref())),
                            marker,
                            String::new(),
                            top::human_bytes(f.tx_bytes as f64),
                            f.connects.to_string(),
                            String::new(),
                            escape(&dst).into_owned(),
                        ])
                        .style(Style::default().add_modifier(Modifier::DIM)),
                    );
                }
            }
        }
        let widths = [
            Constraint::Length(7),
            Constraint::Length(16),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(3),
            Constraint::Min(16),
        ];
        let table = Table::new(rows, widths)
            .header(
                Row::new([
                    "UID", "OWNER", "ORIGIN", "RATE/s", "TOTAL", "CONN", "DST", "BUSIEST",
                ])
                .style(Style::default().add_modifier(Modifier::REVERSED)),
            )
            .block(Block::default().borders(Borders::NONE))
            .row_highlight_style(Style::default().add_modifier(Modifier::BOLD))
            .highlight_symbol(">");
        let mut state = TableState::default();
        state.select(self.selected_row_index());
        frame.render_stateful_widget(table, body, &mut state);
        let help = match &self.error {
            Some(e) => format!("error: {}", escape(e)),
            None => "q quit  s sort  f firmware only  Enter expand  ↑↓ select".to_string(),
        };
        let mut lines = vec![Line::from(help)];
        if let Some(log) = &self.agent_log {
            lines.push(Line::from(format!("agent log: {log}")));
        }
        frame.render_widget(Paragraph::new(lines), footer);
    }

    /// The flows one row sums up: its uid's, in its scope.
    fn flows_of<'a>(&'a self, row: &'a OwnerRow) -> impl Iterator<Item = &'a FlowRecord> {
        self.flows
            .iter()
            .filter(|f| f.uid == row.uid && f.scope.is_local() == row.local)
    }

    /// Table row index of the selected owner (expanded flows take rows).
    fn selected_row_index(&self) -> Option<usize> {
        let visible = self.visible();
        if visible.is_empty() {
            return None;
        }
        let mut index = 0;
        for (i, r) in visible.iter().enumerate() {
            if i == self.selected {
                return Some(index);
            }
            index += 1;
            if self.expanded == Some(r.uid) {
                index += self.flows_of(r).count();
            }
        }
        None
    }

    pub(crate) fn update(
        &mut self,
        flows: Vec<FlowRecord>,
        previous: &HashMap<top::RowKey, u64>,
        elapsed: Duration,
    ) {
        self.rows = top::with_rates(top::group(&flows), previous, elapsed);
        self.flows = flows;
        self.error = None;
        let count = self.visible().len();
        self.selected = self.selected.min(count.saturating_sub(1));
    }
}

impl Default for View {
    fn default() -> Self {
        View::new()
    }
}

pub(crate) fn run(agent: &Endpoint) -> Result<()> {
    let mut terminal = ratatui::init();
    let result = event_loop(&mut terminal, agent);
    ratatui::restore();
    result
}

fn event_loop(terminal: &mut ratatui::DefaultTerminal, agent: &Endpoint) -> Result<()> {
    let mut view = View {
        agent_log: std::env::var(AGENT_LOG_ENV).ok().filter(|p| !p.is_empty()),
        ..View::new()
    };
    let mut previous: HashMap<top::RowKey, u64> = HashMap::new();
    let mut last = Instant::now() - Duration::from_secs(2);
    let mut sampled_at = Instant::now();
    loop {
        if last.elapsed() >= Duration::from_secs(1) {
            match top::sample(agent) {
                Ok(flows) => {
                    view.update(flows, &previous, sampled_at.elapsed());
                    previous = top::totals(&view.rows);
                    sampled_at = Instant::now();
                }
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            last = Instant::now();
        }
        terminal.draw(|f| view.draw(f))?;
        if event::poll(Duration::from_millis(200))? {
            if let Event::Key(key) = event::read()? {
                if key.kind == KeyEventKind::Press && !view.key(key.code) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn flow(uid: u32, owner: &str, firmware: bool, bytes: u64) -> FlowRecord {
        FlowRecord {
            uid_owner: crate::identity::owners::Owner {
                uid,
                user: 0,
                app_id: uid,
                owner: owner.into(),
                packages: vec![],
                origin: if firmware {
                    crate::pipeline::vocab::Origin::Platform
                } else {
                    crate::pipeline::vocab::Origin::App
                },
                firmware,
            },
            comm: Some("curl".into()),
            pid: Some(1),
            cgroup_id: None,
            cgroup: None,
            unit: None,
            exe: None,
            cmdline: None,
            selinux_context: None,
            partition: None,
            proto: crate::pipeline::vocab::Proto::Tcp,
            family: "ipv4".into(),
            dst: "203.0.113.7".into(),
            port: 80,
            connects: 1,
            udp_sends: 0,
            tx_packets: 1,
            tx_bytes: bytes,
            first_seen: None,
            last_seen: None,
            host: None,
            host_source: None,
            country: None,
            asn: None,
            payload: crate::pipeline::vocab::Payload::Unknown,
            leaks: Vec::new(),
            direction: crate::pipeline::vocab::Direction::Outbound,
            scope: Default::default(),
            alerts: Vec::new(),
            blocked: 0,
            block_rule: None,
            block_mode: None,
        }
    }

    fn screen(view: &View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let cells: Vec<String> = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol().to_string())
            .collect();
        cells
            .chunks(80)
            .map(|l| l.concat())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn local_traffic_apart_alerts_marked_and_counted_log_in_the_footer() {
        let mut view = View {
            agent_log: Some("/var/log/egressmon-run.log".into()),
            ..View::new()
        };
        let local = FlowRecord {
            dst: "127.0.0.1".into(),
            port: 9864,
            scope: crate::pipeline::rules::Scope::Loopback,
            ..flow(0, "root", true, 90_000)
        };
        let alerted = FlowRecord {
            alerts: vec!["firmware-cleartext".into(), "firmware-new-country".into()],
            ..flow(0, "root", true, 300)
        };
        view.update(
            vec![local, alerted, flow(10123, "com.example.app", false, 5000)],
            &HashMap::new(),
            Duration::from_secs(1),
        );
        // root twice: its remote row with the others, its local row last,
        // although it is the biggest.
        let order: Vec<(u32, bool)> = view.visible().iter().map(|r| r.key()).collect();
        assert_eq!(order, [(10123, false), (0, false), (0, true)]);
        let shown = screen(&view);
        assert!(shown.contains("owners 2  alerts 2"), "{shown}");
        assert!(shown.contains("!2 root"), "{shown}");
        assert!(
            shown
                .contains(" root             local FW    0 B     87.9 K  1     1   127.0.0.1:9864"),
            "{shown}"
        );
        assert!(
            shown.contains("agent log: /var/log/egressmon-run.log"),
            "{shown}"
        );
        // Expanding root shows each flow under its own row.
        view.selected = 1;
        view.key(KeyCode::Enter);
        let shown = screen(&view);
        let lines: Vec<&str> = shown.lines().collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in\n{shown}"))
        };
        let alerted = at("203.0.113.7:80 f");
        assert!(
            lines[alerted].contains("tcp curl       !2 ")
                && alerted < at("local FW")
                && at("local FW") < at("tcp curl                           87.9 K"),
            "{shown}"
        );
        assert_eq!(view.selected_row_index(), Some(1));
    }

    #[test]
    fn keys_filter_sort_and_expand_in_80x24() {
        let mut view = View::new();
        view.update(
            vec![
                flow(10123, "com.example.app", false, 5000),
                flow(1001, "radio", true, 100),
            ],
            &HashMap::new(),
            Duration::from_secs(1),
        );
        assert_eq!(view.visible()[0].owner, "com.example.app");
        view.key(KeyCode::Char('f'));
        assert_eq!(view.visible().len(), 1);
        assert_eq!(view.visible()[0].owner, "radio");
        view.key(KeyCode::Enter);
        assert_eq!(view.expanded, Some(1001));
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        let lines: Vec<String> = screen
            .chars()
            .collect::<Vec<_>>()
            .chunks(80)
            .map(|l| l.iter().collect())
            .collect();
        let shown = lines.join("\n");
        assert!(
            shown.contains("radio")
                && shown.contains("platform FW")
                && shown.contains("203.0.113.7:80"),
            "{shown}"
        );
        assert!(!view.key(KeyCode::Char('q')));
    }
}
