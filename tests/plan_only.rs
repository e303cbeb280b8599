//! Running a plan compiles nothing: training from a plan read back from its
//! file (sampling with its decode step and LoRA merge, scoring with its
//! log-prob program, running its meta-step, evaluating) orders no graph —
//! the executors follow the schedules the plan holds. (The training crate
//! does not depend on the compiler at all; this checks the executors.)

use coopc_compiler::frontend::parse_pipeline;
use coopc_compiler::ir::{order_calls, DType, Graph};
use coopc_compiler::plan::Plan;
use coopc_runtime::{execute, HostTensor};
use coopc_train::{RunOptions, Trainer};
use std::collections::HashMap;

#[test]
fn training_from_a_plan_file_orders_no_graph() {
    let dir = std::env::temp_dir().join(format!("coopc-plan-only-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec =
        parse_pipeline(include_str!("../examples/addition.toml")).expect("example parses");
    spec.train.steps = 3;
    spec.train.eval_every = 2;
    let path = dir.join("addition.plan");
    coopc_compiler::compile(spec).write(&path).unwrap();

    // The counter counts: running a bare graph orders it.
    let mut g = Graph::new();
    let x = g.input("x", DType::F64, vec![2]);
    let y = g.exp(x);
    g.set_output("y", y);
    let before = order_calls();
    let inputs = HashMap::from([(
        "x".to_string(),
        HostTensor::from_f64(DType::F64, vec![2], &[0.0, 1.0]).unwrap(),
    )]);
    execute(&g, &inputs).unwrap();
    assert_eq!(order_calls(), before + 1);

    // A whole run from the plan file orders nothing.
    let plan = Plan::read(&path).unwrap();
    let steps = plan.spec.train.steps;
    let before = order_calls();
    let opts = RunOptions {
        out_dir: dir.join("run"),
        resume: false,
        progress: false,
        eval_limit: 4,
        stop_after: None,
    };
    let mut trainer = Trainer::new(plan, opts).expect("trainer");
    let metrics = trainer.run(|_| {}).expect("training runs");
    assert_eq!(metrics.len(), steps);
    assert!(
        metrics.iter().any(|m| m.eval_accuracy.is_some()),
        "it evaluated"
    );
    assert!(metrics.iter().all(|m| m.sft_loss.is_finite()));
    assert_eq!(
        order_calls(),
        before,
        "running the plan ordered a graph: an executor scheduled at run time"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
