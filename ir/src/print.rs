//! Human-readable text form and Graphviz DOT export of a graph. Nodes are
//! listed in topological order and named `%i` by their node index, the
//! number error messages use too.

use super::graph::{Graph, NodeId};
use std::collections::HashMap;
use std::fmt::Write;

/// Topological order, and node → displayed number (its index).
fn numbering(g: &Graph) -> (Vec<NodeId>, HashMap<NodeId, usize>) {
    let order = g.topo_order();
    let num = order.iter().map(|&id| (id, id.index())).collect();
    (order, num)
}

/// The text form:
/// ```text
/// %2: f32[2,4] = matmul(%0, %1)
/// ```
/// one line per node, then `return name = %n, …`.
pub fn to_text(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut s = String::from("graph {\n");
    for &id in &order {
        let node = g.node(id);
        let args: Vec<String> = g
            .inputs(id)
            .iter()
            .map(|i| format!("%{}", num[i]))
            .collect();
        let call = if args.is_empty() {
            String::new()
        } else {
            format!("({})", args.join(", "))
        };
        let _ = writeln!(s, "  %{}: {} = {}{call}", num[&id], node.ty, node.op);
    }
    let outs: Vec<String> = g
        .outputs()
        .iter()
        .map(|(n, id)| {
            format!(
                "{n} = %{}",
                num.get(id).map_or("?".to_string(), |v| v.to_string())
            )
        })
        .collect();
    let _ = writeln!(s, "  return {}", outs.join(", "));
    s.push_str("}\n");
    s
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz DOT: one box per node labelled with its number, op and type;
/// edges labelled with the operand slot when an op has several operands;
/// outputs as extra ellipses.
pub fn to_dot(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut s = String::from(
        "digraph coopc {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    for &id in &order {
        let node = g.node(id);
        let style = if node.op.is_source() {
            ", style=rounded"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "  n{} [label=\"%{} {}\\n{}\"{style}];",
            num[&id],
            num[&id],
            dot_escape(&node.op.to_string()),
            node.ty
        );
    }
    for &id in &order {
        let ins = g.inputs(id);
        for (slot, i) in ins.iter().enumerate() {
            if ins.len() > 1 {
                let _ = writeln!(s, "  n{} -> n{} [label=\"{slot}\"];", num[i], num[&id]);
            } else {
                let _ = writeln!(s, "  n{} -> n{};", num[i], num[&id]);
            }
        }
    }
    for (k, (name, id)) in g.outputs().iter().enumerate() {
        if let Some(n) = num.get(id) {
            let _ = writeln!(
                s,
                "  out{k} [label=\"{}\", shape=ellipse];",
                dot_escape(name)
            );
            let _ = writeln!(s, "  n{n} -> out{k};");
        }
    }
    s.push_str("}\n");
    s
}
