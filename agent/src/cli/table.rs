//! Plain text tables for the CLI (`status`, `tasks`, `saves`): columns sized to their
//! widest cell and two spaces apart, no borders, no trailing blanks — comfy-table does
//! the measuring (wide characters included).

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};

/// A column: its header and whether its values are right-aligned (numbers).
pub struct Col {
    pub header: &'static str,
    pub right: bool,
}

pub const fn left(header: &'static str) -> Col {
    Col {
        header,
        right: false,
    }
}

pub const fn right(header: &'static str) -> Col {
    Col {
        header,
        right: true,
    }
}

/// The table as lines, each ending in `\n`, indented by `indent`.
pub fn render(cols: &[Col], rows: Vec<Vec<String>>, indent: &str) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if cols.iter().any(|c| !c.header.is_empty()) {
        t.set_header(cols.iter().map(|c| c.header));
    }
    for row in rows {
        t.add_row(row);
    }
    let n = cols.len();
    for (i, (col, spec)) in t.column_iter_mut().zip(cols).enumerate() {
        col.set_padding((0, if i + 1 == n { 0 } else { 2 }));
        if spec.right {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(indent);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
