//! The tasks: the character tokenizer, the addition and countdown generators
//! and verifiers, and the JSON-lines task (files, answer extraction).

use coopc_compiler::frontend::builtin_vocab_size;
use coopc_compiler::spec::{TaskKind, TaskSpec};
use coopc_train::tasks::addition::{Addition, AdditionConfig};
use coopc_train::tasks::countdown::{self, Countdown, CountdownConfig, Expr, Parsed};
use coopc_train::tasks::jsonl::{answers_match, extract_answer, normalize_answer};
use coopc_train::tasks::tokenizer::{CharTokenizer, Tokenizer, BOS, EOS, PAD};
use coopc_train::tasks::{
    build_task, build_task_in, check_vocab, Example, Problem, Rewards, Task, TaskError, Verdict,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::PathBuf;

const SEQ_LEN: usize = 64;

fn spec(kind: TaskKind) -> TaskSpec {
    TaskSpec {
        kind,
        tokenizer: None,
        sft_file: None,
        rl_file: None,
        eval_file: None,
        reward_correct: 1.0,
        reward_wrong: -1.0,
        sft_max_digits: 3,
        rl_max_digits: 4,
        eval_digits: None,
        format: Default::default(),
        chat_template: false,
        system_prompt: None,
        reward_malformed: None,
        sft_pool: None,
        sft_flaw: Default::default(),
        sft_carry_free: false,
        countdown: Default::default(),
    }
}

fn addition() -> Addition {
    Addition::new(AdditionConfig::default(), Rewards::default(), SEQ_LEN).unwrap()
}

fn countdown() -> Countdown {
    Countdown::new(CountdownConfig::default(), Rewards::default(), SEQ_LEN).unwrap()
}

fn problem(prompt: &str, answer: &str) -> Problem {
    Problem {
        prompt: prompt.into(),
        answer: answer.into(),
    }
}

/// Checks that every SFT, RL and held-out sequence of `task` fits `seq_len`
/// and round-trips through the tokenizer.
fn check_fits_and_round_trips(task: &dyn Task, seq_len: usize, draws: usize) {
    let tok = task.tokenizer();
    let mut rng = StdRng::seed_from_u64(7);
    let check = |prompt: &str, response: Option<&str>| {
        let ids = tok.encode(prompt).unwrap();
        assert_eq!(tok.decode(&ids), prompt);
        match response {
            Some(r) => {
                let row = task
                    .encode_example(&Example {
                        prompt: prompt.into(),
                        response: r.into(),
                    })
                    .unwrap();
                assert!(
                    row.tokens.len() <= seq_len,
                    "{prompt}{r}: {} tokens",
                    row.tokens.len()
                );
                assert_eq!(row.tokens[0], tok.bos());
                assert_eq!(*row.tokens.last().unwrap(), tok.eos());
                assert_eq!(row.prompt_len + row.response_len, row.tokens.len());
                let resp = &row.tokens[row.prompt_len..];
                assert_eq!(task.decode_response(resp), r);
                if let Some(max) = task.max_response_tokens() {
                    assert!(row.response_len <= max, "{r}: {} > {max}", row.response_len);
                }
            }
            None => assert!(1 + ids.len() < seq_len),
        }
    };
    for _ in 0..draws {
        let ex = task.sft_example(&mut rng);
        check(&ex.prompt, Some(&ex.response));
        let p = task.rl_problem(&mut rng);
        check(&p.prompt, None);
    }
    for p in task.eval_set() {
        check(&p.prompt, None);
    }
}

// ---------------------------------------------------------------------------
// Character tokenizer
// ---------------------------------------------------------------------------

#[test]
fn builtin_vocabularies_have_the_frontend_sizes() {
    for kind in [TaskKind::Addition, TaskKind::Countdown] {
        let tok = CharTokenizer::for_task(kind).unwrap();
        assert_eq!(Some(tok.vocab_size()), builtin_vocab_size(kind), "{kind:?}");
        assert_eq!((tok.pad(), tok.bos(), tok.eos()), (PAD, BOS, EOS));
        assert_eq!((PAD, BOS, EOS), (0, 1, 2));
    }
    assert!(CharTokenizer::for_task(TaskKind::Jsonl).is_err());
}

#[test]
fn char_tokenizer_round_trips_its_alphabet_and_numbers_ids_after_specials() {
    let tok = CharTokenizer::for_task(TaskKind::Countdown).unwrap();
    let text: String = tok.alphabet().iter().collect();
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids, (3..tok.vocab_size() as i32).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids), text);
}

#[test]
fn char_tokenizer_rejects_unknown_characters_naming_them() {
    let tok = CharTokenizer::for_task(TaskKind::Addition).unwrap();
    let err = tok.encode("12+x=").unwrap_err();
    assert_eq!(
        err,
        TaskError::UnknownChar {
            ch: 'x',
            vocabulary: "addition".into()
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("'x'") && msg.contains("addition"), "{msg}");
    let msg = tok.encode("1+é").unwrap_err().to_string();
    assert!(msg.contains("'é'") && msg.contains("U+00E9"), "{msg}");
}

#[test]
fn char_tokenizer_decode_drops_specials_and_marks_unknown_ids() {
    let tok = CharTokenizer::for_task(TaskKind::Addition).unwrap();
    let one = tok.encode("1").unwrap()[0];
    assert_eq!(tok.decode(&[BOS, one, PAD, one, EOS]), "11");
    assert_eq!(
        tok.decode(&[one, 999, -5, i32::MIN, i32::MAX]),
        "1\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"
    );
}

#[test]
fn char_tokenizer_rejects_a_repeated_character() {
    assert!(CharTokenizer::new("x", "abca".chars()).is_err());
}

#[test]
fn decode_response_stops_at_the_first_eos() {
    let task = addition();
    let tok = task.tokenizer();
    let mut ids = tok.encode("12#3").unwrap();
    ids.push(EOS);
    ids.extend(tok.encode("#9").unwrap());
    assert_eq!(task.decode_response(&ids), "12#3");
}

// ---------------------------------------------------------------------------
// Addition
// ---------------------------------------------------------------------------

#[test]
fn addition_demonstration_is_the_carry_chain_then_the_sum() {
    assert_eq!(Addition::solve(1234, 5678), "48012,37111,26109,15006#6912");
    assert_eq!(Addition::solve(999, 1), "91010,90110,90110#1000");
    assert_eq!(Addition::solve(0, 0), "00000#0");
    assert_eq!(Addition::solve(5, 70), "50005,07007#75");
    let task = addition();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..500 {
        let ex = task.sft_example(&mut rng);
        let (a, b) = Addition::parse_prompt(&ex.prompt).unwrap();
        assert_eq!(ex.response, Addition::solve(a, b));
        let p = problem(&ex.prompt, &(a + b).to_string());
        assert_eq!(task.verify(&p, &ex.response), Verdict::Correct);
    }
    for p in task.eval_set() {
        let (a, b) = Addition::parse_prompt(&p.prompt).unwrap();
        assert_eq!(task.verify(&p, &Addition::solve(a, b)), Verdict::Correct);
    }
}

#[test]
fn addition_verifier_grades_correct_wrong_and_malformed_answers() {
    let task = addition();
    let p = problem("1234+5678=", "6912");
    let huge = format!("#{}", "9".repeat(200));
    let long_no_answer = "48012,".repeat(20_000);
    let long_then_answer = format!("{}#6912", "1".repeat(50_000));
    let cases: &[(&str, Verdict)] = &[
        ("48012,37111,26109,15006#6912", Verdict::Correct),
        ("#6912", Verdict::Correct),
        ("#6912 \n", Verdict::Correct),
        ("garbage steps#6912", Verdict::Correct),
        (&long_then_answer, Verdict::Correct),
        ("48012,37111,26109,15006#6913", Verdict::Wrong),
        ("#06912", Verdict::Wrong),
        ("#691", Verdict::Wrong),
        ("#69120", Verdict::Wrong),
        (&huge, Verdict::Wrong),
        ("", Verdict::Malformed),
        ("48012,37111,26109,15006", Verdict::Malformed),
        (&long_no_answer, Verdict::Malformed),
        ("#", Verdict::Malformed),
        ("#6912#6912", Verdict::Malformed),
        ("#6912#1", Verdict::Malformed),
        ("##6912", Verdict::Malformed),
        ("# 6912", Verdict::Malformed),
        ("#x6912", Verdict::Malformed),
        ("#6912x", Verdict::Malformed),
        ("#69 12", Verdict::Malformed),
        ("#-6912", Verdict::Malformed),
        ("#+6912", Verdict::Malformed),
        ("#6,912", Verdict::Malformed),
        ("#６９１２", Verdict::Malformed),
        ("#6912🙂", Verdict::Malformed),
        ("#٦٩١٢", Verdict::Malformed),
    ];
    for (response, want) in cases {
        let shown: String = response.chars().take(40).collect();
        assert_eq!(task.verify(&p, response), *want, "response {shown:?}");
    }
}

#[test]
fn addition_rewards_come_from_the_spec() {
    let mut s = spec(TaskKind::Addition);
    s.reward_correct = 2.0;
    s.reward_wrong = -0.5;
    let task = build_task(&s, SEQ_LEN).unwrap();
    let p = problem("1+2=", "3");
    assert_eq!(task.reward(&p, "#3"), 2.0);
    assert_eq!(task.reward(&p, "#4"), -0.5);
    assert_eq!(task.reward(&p, "3"), -0.5);
    assert!(task.is_correct(&p, "#3"));
    assert!(!task.is_correct(&p, "#4"));
}

#[test]
fn addition_is_deterministic_under_a_seed() {
    let (t1, t2) = (addition(), addition());
    let draw = |t: &Addition, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..50)
            .map(|_| (t.sft_example(&mut rng), t.rl_problem(&mut rng)))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(&t1, 11), draw(&t2, 11));
    assert_ne!(draw(&t1, 11), draw(&t1, 12));
    assert_eq!(t1.eval_set(), t2.eval_set());
    assert_eq!(t1.eval_set().len(), 128);
}

#[test]
fn addition_sft_rl_and_eval_cover_their_digit_ranges() {
    let task = addition();
    let mut rng = StdRng::seed_from_u64(5);
    let (mut sft_max, mut rl_max) = (0u64, 0u64);
    let mut rl_four_digit = 0;
    for _ in 0..5000 {
        let (a, b) = Addition::parse_prompt(&task.sft_example(&mut rng).prompt).unwrap();
        sft_max = sft_max.max(a).max(b);
        let (a, b) = Addition::parse_prompt(&task.rl_problem(&mut rng).prompt).unwrap();
        rl_max = rl_max.max(a).max(b);
        if a >= 1000 && b >= 1000 {
            rl_four_digit += 1;
        }
    }
    assert!(
        (100..1000).contains(&sft_max),
        "SFT operands up to 3 digits, got {sft_max}"
    );
    assert!(
        (1000..10000).contains(&rl_max),
        "RL operands up to 4 digits, got {rl_max}"
    );
    assert!(rl_four_digit > 0);
    // The default split is in-distribution: held-out operands are drawn
    // like RL prompts, 1 to 4 digits each, every length represented.
    let mut lengths = std::collections::BTreeSet::new();
    for p in task.eval_set() {
        let (a, b) = Addition::parse_prompt(&p.prompt).unwrap();
        assert!(a < 10000 && b < 10000, "{}", p.prompt);
        lengths.insert(a.to_string().len());
        assert_eq!(p.answer, (a + b).to_string());
    }
    assert_eq!(lengths.into_iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
    // With eval_digits, a length split: both operands of exactly 4 digits.
    let longer = Addition::new(
        AdditionConfig {
            eval_digits: Some(4),
            ..AdditionConfig::default()
        },
        Rewards::default(),
        SEQ_LEN,
    )
    .unwrap();
    for p in longer.eval_set() {
        let (a, b) = Addition::parse_prompt(&p.prompt).unwrap();
        assert!(
            (1000..10000).contains(&a) && (1000..10000).contains(&b),
            "{}",
            p.prompt
        );
    }
}

/// Over a long draw, neither an SFT demonstration nor an RL prompt is ever
/// a held-out problem (in either operand order), in the in-distribution
/// split and in a length split whose held-out length RL also draws. The
/// ranges are small so that a draw without the exclusion would hit the
/// held-out set often (counted, so the check cannot pass vacuously).
#[test]
fn addition_held_out_problems_never_train() {
    for (sft, rl, eval_digits) in [(1..=1, 1..=2, None), (1..=2, 1..=3, Some(2))] {
        let task = Addition::new(
            AdditionConfig {
                sft_digits: sft.clone(),
                rl_digits: rl.clone(),
                eval_digits,
                eval_size: 20,
                ..AdditionConfig::default()
            },
            Rewards::default(),
            SEQ_LEN,
        )
        .unwrap();
        let held = task.eval_set();
        assert_eq!(held.len(), 20);
        // How often a plain draw of the SFT range lands on a held-out pair.
        let mut rng = StdRng::seed_from_u64(1);
        let number = |rng: &mut StdRng, d: usize| {
            use rand::Rng;
            if d == 1 {
                rng.gen_range(0..10u64)
            } else {
                rng.gen_range(10u64.pow(d as u32 - 1)..10u64.pow(d as u32))
            }
        };
        let plain_hits = (0..20_000)
            .filter(|_| {
                use rand::Rng;
                let (da, db) = (rng.gen_range(sft.clone()), rng.gen_range(sft.clone()));
                let (a, b) = (number(&mut rng, da), number(&mut rng, db));
                task.is_held_out(a, b)
            })
            .count();
        assert!(plain_hits > 20, "{sft:?}: only {plain_hits} plain hits");
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..20_000 {
            let (a, b) = Addition::parse_prompt(&task.sft_example(&mut rng).prompt).unwrap();
            assert!(!task.is_held_out(a, b), "SFT demonstrated held-out {a}+{b}");
            let (a, b) = Addition::parse_prompt(&task.rl_problem(&mut rng).prompt).unwrap();
            assert!(!task.is_held_out(a, b), "RL drew held-out {a}+{b}");
        }
        for p in &held {
            let (a, b) = Addition::parse_prompt(&p.prompt).unwrap();
            assert!(task.is_held_out(a, b) && task.is_held_out(b, a));
        }
    }
}

#[test]
fn addition_sequences_fit_seq_len_and_round_trip() {
    let task = addition();
    check_fits_and_round_trips(&task, SEQ_LEN, 2000);
    // The longest sequence: two 4-digit operands with a carry out.
    let longest = task
        .encode_example(&Example {
            prompt: "9999+9999=".into(),
            response: Addition::solve(9999, 9999),
        })
        .unwrap();
    assert_eq!(
        longest.tokens.len(),
        Addition::longest_sequence(task.config())
    );
    assert_eq!(longest.tokens.len(), 41);
    assert_eq!(Some(longest.response_len), task.max_response_tokens());
    assert!(longest.tokens.len() <= SEQ_LEN);
}

#[test]
fn addition_refuses_a_seq_len_its_longest_sequence_does_not_fit() {
    let err = Addition::new(AdditionConfig::default(), Rewards::default(), 40)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            TaskError::TooLong {
                len: 41,
                seq_len: 40,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("train.seq_len"), "{err}");
    assert!(Addition::new(AdditionConfig::default(), Rewards::default(), 41).is_ok());
    let longer = AdditionConfig {
        rl_digits: 1..=6,
        eval_digits: Some(6),
        ..AdditionConfig::default()
    };
    assert!(Addition::new(longer.clone(), Rewards::default(), SEQ_LEN).is_ok());
    let too_long = AdditionConfig {
        eval_digits: Some(7),
        ..longer
    };
    assert!(Addition::new(too_long, Rewards::default(), SEQ_LEN).is_err());
}

#[test]
fn addition_rejects_invalid_digit_ranges() {
    #[allow(clippy::reversed_empty_ranges)]
    for config in [
        AdditionConfig {
            sft_digits: 0..=3,
            ..AdditionConfig::default()
        },
        AdditionConfig {
            rl_digits: 4..=3,
            ..AdditionConfig::default()
        },
        AdditionConfig {
            eval_digits: Some(19),
            ..AdditionConfig::default()
        },
        AdditionConfig {
            eval_digits: Some(1),
            eval_size: 40,
            ..AdditionConfig::default()
        },
    ] {
        assert!(matches!(
            Addition::new(config, Rewards::default(), 1000),
            Err(TaskError::Config(_))
        ));
    }
}

// ---------------------------------------------------------------------------
// Countdown
// ---------------------------------------------------------------------------

/// Checks each `a op b=c` step of a trace is exact arithmetic.
fn check_steps(response: &str) {
    let (trace, _) = response.split_once('#').unwrap();
    for step in trace.split(',') {
        let (lhs, c) = step.split_once('=').unwrap();
        let c: i128 = c.parse().unwrap();
        let Ok(Parsed::Expr(e)) = countdown::parse_expression(lhs) else {
            panic!("step {step}");
        };
        assert!(matches!(e, Expr::Bin(..)), "step {step}");
        assert_eq!(e.eval(), Ok(c), "step {step}");
    }
}

#[test]
fn countdown_instances_are_solved_by_their_own_demonstration() {
    let task = countdown();
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..2000 {
        let ex = task.sft_example(&mut rng);
        let p = problem(&ex.prompt, "");
        assert_eq!(
            task.verify(&p, &ex.response),
            Verdict::Correct,
            "{}{}",
            ex.prompt,
            ex.response
        );
        check_steps(&ex.response);
        let (numbers, target) = countdown::parse_prompt(&ex.prompt).unwrap();
        assert!((3..=4).contains(&numbers.len()));
        assert!(numbers.iter().all(|&n| (1..=10).contains(&n)));
        assert!((1..=100).contains(&target));
        assert_eq!(ex.response.matches(',').count(), numbers.len() - 2);
    }
    for inst in task.eval_instances() {
        let p = inst.problem();
        assert_eq!(task.verify(&p, &inst.response()), Verdict::Correct);
        // The reference answer is itself a solving expression.
        assert_eq!(task.verify(&p, &format!("#{}", p.answer)), Verdict::Correct);
    }
}

#[test]
fn countdown_demonstration_format() {
    let task = countdown();
    let inst = &task.eval_instances()[0];
    let prompt = inst.prompt();
    let list: Vec<String> = inst.numbers.iter().map(u64::to_string).collect();
    assert_eq!(prompt, format!("{}>{}:", list.join(","), inst.target));
    assert_eq!(
        inst.response(),
        format!("{}#{}", inst.steps.join(","), inst.solution.render())
    );
}

#[test]
fn countdown_verifier_grades_correct_wrong_and_malformed_answers() {
    let task = countdown();
    let p = problem("3,5,4>32:", "(3+5)*4");
    let deep = format!("#{}3{}", "(".repeat(5000), ")".repeat(5000));
    let long_sum = format!("#{}1", "1+".repeat(20_000));
    let cases: &[(&str, Verdict)] = &[
        ("3+5=8,8*4=32#(3+5)*4", Verdict::Correct),
        ("#4*(5+3)", Verdict::Correct),
        ("# ( 3 + 5 ) * 4 \n", Verdict::Correct),
        ("#((3+5))*4", Verdict::Correct),
        ("#3+5*4", Verdict::Wrong),
        ("#(3+5)*4*4", Verdict::Wrong),
        ("#(3+5)*8", Verdict::Wrong),
        ("#32", Verdict::Wrong),
        ("#5/3", Verdict::Wrong),
        ("#3*5*4-3", Verdict::Wrong),
        (&format!("#{}", "9".repeat(40)), Verdict::Wrong),
        (&format!("#(3+5)*{}", "4".repeat(25)), Verdict::Wrong),
        (&long_sum, Verdict::Wrong),
        ("", Verdict::Malformed),
        ("(3+5)*4", Verdict::Malformed),
        ("#", Verdict::Malformed),
        ("#   ", Verdict::Malformed),
        ("#(3+5)*4#(3+5)*4", Verdict::Malformed),
        ("#(3+5*4", Verdict::Malformed),
        ("#3+5)*4", Verdict::Malformed),
        ("#(3+5)4", Verdict::Malformed),
        ("#-3+5", Verdict::Malformed),
        ("#03+5", Verdict::Malformed),
        ("#3++5", Verdict::Malformed),
        ("#３+５", Verdict::Malformed),
        ("#(3+5)*4 = 32", Verdict::Malformed),
        ("#(3+5)×4", Verdict::Malformed),
        ("#(3+5)*4🙂", Verdict::Malformed),
        ("#import os", Verdict::Malformed),
        (&deep, Verdict::Malformed),
    ];
    for (response, want) in cases {
        let shown: String = response.chars().take(40).collect();
        assert_eq!(task.verify(&p, response), *want, "response {shown:?}");
    }
    // Division by zero is malformed; numbers may be left unused.
    let p = problem("5,5,4,7>2:", "");
    assert_eq!(task.verify(&p, "#4/(5-5)"), Verdict::Malformed);
    assert_eq!(task.verify(&p, "#(5+5)/5"), Verdict::Wrong);
    assert_eq!(task.verify(&p, "#(5+5-4-7+4)"), Verdict::Wrong);
    assert_eq!(task.verify(&p, "#(5+5)-4*2"), Verdict::Wrong);
    assert_eq!(task.verify(&p, "#5/5+7/7"), Verdict::Wrong);
    assert_eq!(task.verify(&p, "#(7-5)*(5-4)"), Verdict::Correct);
    assert_eq!(task.verify(&p, "#7-5"), Verdict::Correct);
    // A prompt the task did not make.
    assert_eq!(task.verify(&problem("what?", ""), "#1"), Verdict::Malformed);
}

#[test]
fn countdown_rendering_keeps_the_value_with_minimal_parentheses() {
    let render = |s: &str| match countdown::parse_expression(s).unwrap() {
        Parsed::Expr(e) => e.render(),
        Parsed::OversizeNumber => panic!(),
    };
    assert_eq!(render("2*(3+4)"), "2*(3+4)");
    assert_eq!(render("(2*3)+4"), "2*3+4");
    assert_eq!(render("8-(3-1)"), "8-(3-1)");
    assert_eq!(render("(8-3)-1"), "8-3-1");
    assert_eq!(render("8/(4/2)"), "8/(4/2)");
    assert_eq!(render("(3+5)*(9-7)"), "(3+5)*(9-7)");
    assert_eq!(render("6 * ( 4 / 2 )"), "6*4/2");
    let task = countdown();
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..1000 {
        let inst = task.generate(&mut rng, &(3..=4));
        let Parsed::Expr(back) = countdown::parse_expression(&inst.solution.render()).unwrap()
        else {
            panic!();
        };
        assert_eq!(back.eval(), Ok(inst.target as i128));
        assert_eq!(inst.solution.eval(), Ok(inst.target as i128));
    }
}

#[test]
fn countdown_is_deterministic_and_keeps_rl_off_the_held_out_set() {
    let (t1, t2) = (countdown(), countdown());
    let draw = |t: &Countdown, seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..50)
            .map(|_| (t.sft_example(&mut rng), t.rl_problem(&mut rng)))
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(&t1, 4), draw(&t2, 4));
    assert_ne!(draw(&t1, 4), draw(&t1, 5));
    assert_eq!(t1.eval_set(), t2.eval_set());
    assert_eq!(t1.eval_set().len(), 128);
    let key = |prompt: &str| {
        let (mut n, t) = countdown::parse_prompt(prompt).unwrap();
        n.sort_unstable();
        (n, t)
    };
    let held: std::collections::HashSet<_> = t1.eval_set().iter().map(|p| key(&p.prompt)).collect();
    assert_eq!(held.len(), 128, "held-out puzzles are distinct");
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..3000 {
        assert!(!held.contains(&key(&t1.rl_problem(&mut rng).prompt)));
        assert!(!held.contains(&key(&t1.sft_example(&mut rng).prompt)));
    }
}

#[test]
fn countdown_sequences_fit_seq_len_and_round_trip() {
    let task = countdown();
    assert_eq!(task.max_response_tokens(), Some(48));
    check_fits_and_round_trips(&task, SEQ_LEN, 2000);
    // A tighter budget is honoured by redrawing.
    let short = Countdown::new(CountdownConfig::default(), Rewards::default(), 40).unwrap();
    check_fits_and_round_trips(&short, 40, 500);
    // One that can never be met is refused.
    let err = Countdown::new(CountdownConfig::default(), Rewards::default(), 12)
        .err()
        .unwrap();
    assert!(err.to_string().contains("train.seq_len"), "{err}");
}

// ---------------------------------------------------------------------------
// JSON lines
// ---------------------------------------------------------------------------

#[test]
fn jsonl_answer_extraction() {
    let cases: &[(&str, Option<&str>)] = &[
        ("so it is 42\n#### 42", Some("42")),
        ("#### 1\nthen #### 2 ", Some("2")),
        ("#####7", Some("7")),
        ("the answer is \\boxed{42}.", Some("42")),
        ("\\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
        ("\\boxed{1} or rather \\boxed{ 2 }", Some("2")),
        ("\\boxed{x} #### 5", Some("5")),
        ("#### \\boxed{3}", Some("\\boxed{3}")),
        ("\\boxed{unclosed {2}", None),
        ("\\boxed{}", None),
        ("####   ", None),
        ("42", None),
        ("", None),
        ("### 42", None),
        ("#### héllo wörld ", Some("héllo wörld")),
    ];
    for (response, want) in cases {
        assert_eq!(extract_answer(response).as_deref(), *want, "{response:?}");
    }
    let long = format!("{}#### 7", "x".repeat(100_000));
    assert_eq!(extract_answer(&long).as_deref(), Some("7"));
}

#[test]
fn jsonl_answers_compare_numbers_by_value_and_text_by_normalised_whitespace() {
    for (a, b) in [
        ("1,000", "1000"),
        ("1000", "1000.0"),
        ("1,000", "1000.00"),
        (" 1000 ", "1000"),
        ("+7", "7"),
        ("-0", "0"),
        ("0.50", ".5"),
        ("007", "7"),
        ("-1,234.5", "-1234.50"),
        ("12,345,678,901,234,567,890,123", "12345678901234567890123"),
        ("a  b\n c", "a b c"),
    ] {
        assert!(answers_match(a, b), "{a:?} vs {b:?}");
    }
    for (a, b) in [
        ("1,00", "100"),
        ("1000", "1001"),
        ("12345678901234567890123", "12345678901234567890124"),
        ("-5", "5"),
        ("1.2.3", "1.23"),
        ("abc", "ABC"),
        ("1 000", "1000"),
        ("", "0"),
    ] {
        assert!(!answers_match(a, b), "{a:?} vs {b:?}");
    }
    assert_eq!(normalize_answer("1,000.50"), "1000.5");
}

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("coopc-tasks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn jsonl_spec(dir: &std::path::Path, eval: bool) -> TaskSpec {
    TaskSpec {
        sft_file: Some("sft.jsonl".into()),
        rl_file: Some("rl.jsonl".into()),
        eval_file: eval.then(|| dir.join("eval.jsonl").display().to_string()),
        ..spec(TaskKind::Jsonl)
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn jsonl_task_reads_files_and_verifies_answers() {
    let dir = temp_dir("ok");
    write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"2+2?\", \"response\": \"4 #### 4\"}\n\n{\"prompt\": \"3*3?\", \"response\": \"\\\\boxed{9}\", \"extra\": 1}\n",
    );
    write(
        &dir,
        "rl.jsonl",
        "{\"prompt\": \"10*100?\", \"answer\": 1000}\n{\"prompt\": \"half?\", \"answer\": \"0.5\"}\n",
    );
    write(
        &dir,
        "eval.jsonl",
        "{\"prompt\": \"7+8?\", \"answer\": \"15\"}\n",
    );
    let task = build_task_in(&jsonl_spec(&dir, true), 32, &dir).unwrap();
    assert_eq!(task.eval_set(), vec![problem("7+8?", "15")]);
    assert_eq!(task.max_response_tokens(), None);
    let p = problem("10*100?", "1000");
    assert_eq!(task.verify(&p, "it is #### 1,000"), Verdict::Correct);
    assert_eq!(task.verify(&p, "\\boxed{1000.0}"), Verdict::Correct);
    assert_eq!(task.verify(&p, "#### 1001"), Verdict::Wrong);
    assert_eq!(task.verify(&p, "#### 1000 #### 999"), Verdict::Wrong);
    // With no answer in a recognised format, the last number still counts
    // when it is right; a wrong one is malformed, not wrong.
    assert_eq!(task.verify(&p, "so 10 times 100 is 1000"), Verdict::Correct);
    assert_eq!(task.verify(&p, "1000"), Verdict::Correct);
    assert_eq!(task.verify(&p, "maybe 999"), Verdict::Malformed);
    assert_eq!(task.verify(&p, "the answer is 1000."), Verdict::Correct);
    assert_eq!(task.verify(&p, "The answer is 999."), Verdict::Wrong);
    assert_eq!(task.verify(&p, ""), Verdict::Malformed);
    assert_eq!(
        task.verify(&p, &format!("#### {}", "9".repeat(500))),
        Verdict::Wrong
    );
    // Draws come from the files, deterministically.
    let draw = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..20)
            .map(|_| (task.sft_example(&mut rng), task.rl_problem(&mut rng)))
            .collect::<Vec<_>>()
    };
    let a = draw(3);
    assert_eq!(a, draw(3));
    assert!(a
        .iter()
        .any(|(e, _)| e.prompt == "3*3?" && e.response == "\\boxed{9}"));
    assert!(a.iter().any(|(_, p)| *p == problem("10*100?", "1000")));
    // The character tokenizer covers the data and `#### ` answers.
    check_fits_and_round_trips(task.as_ref(), 32, 50);
    let tok = task.tokenizer();
    assert!(tok.encode("#### 0123456789").is_ok());
    assert!(check_vocab(task.as_ref(), tok.vocab_size()).is_ok());
    let err = check_vocab(task.as_ref(), 10).unwrap_err();
    assert!(err.to_string().contains("model.vocab_size"), "{err}");
    // No eval file: no held-out problems.
    let task = build_task_in(&jsonl_spec(&dir, false), 32, &dir).unwrap();
    assert!(task.eval_set().is_empty());
}

/// Records whose prompt is a held-out problem's (up to whitespace) are left
/// out of SFT and RL; files left with nothing are an error naming them.
#[test]
fn jsonl_held_out_prompts_never_train() {
    let dir = temp_dir("overlap");
    write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"7+8?\", \"response\": \"#### 15\"}\n{\"prompt\": \"2+2?\", \"response\": \"#### 4\"}\n",
    );
    write(
        &dir,
        "rl.jsonl",
        "{\"prompt\": \"1+1?\", \"answer\": 2}\n{\"prompt\": \" 7+8? \", \"answer\": 15}\n{\"prompt\": \"9*9?\", \"answer\": 81}\n",
    );
    write(
        &dir,
        "eval.jsonl",
        "{\"prompt\": \"7+8?\", \"answer\": \"15\"}\n",
    );
    let spec = jsonl_spec(&dir, true);
    let task = coopc_train::tasks::jsonl::JsonlTask::load(&spec, 32, &dir).unwrap();
    assert_eq!(task.held_out_overlap(), (1, 1));
    assert!(task.sft_examples().iter().all(|e| e.prompt != "7+8?"));
    assert_eq!(task.rl_problems().len(), 2);
    let mut rng = StdRng::seed_from_u64(0);
    for _ in 0..200 {
        assert_ne!(task.sft_example(&mut rng).prompt, "7+8?");
        assert_ne!(task.rl_problem(&mut rng).prompt.trim(), "7+8?");
    }
    // An RL file that is all held out leaves nothing to train on.
    write(&dir, "rl.jsonl", "{\"prompt\": \"7+8?\", \"answer\": 15}\n");
    let err = build_task_in(&spec, 32, &dir).err().unwrap().to_string();
    assert!(
        err.contains("rl.jsonl") && err.contains("held-out"),
        "{err}"
    );
}

/// The error of loading a jsonl task whose `name` file is `text` (the other
/// files valid).
fn load_error(case: &str, name: &str, text: &str, seq_len: usize) -> String {
    let dir = temp_dir(case);
    write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"p\", \"response\": \"r\"}\n",
    );
    write(&dir, "rl.jsonl", "{\"prompt\": \"p\", \"answer\": \"a\"}\n");
    write(
        &dir,
        "eval.jsonl",
        "{\"prompt\": \"q\", \"answer\": \"a\"}\n",
    );
    write(&dir, name, text);
    let err = build_task_in(&jsonl_spec(&dir, true), seq_len, &dir)
        .err()
        .unwrap();
    err.to_string()
}

#[test]
fn jsonl_errors_name_the_file_and_line() {
    let good = "{\"prompt\": \"p\", \"response\": \"r\"}\n";
    let msg = load_error(
        "badjson",
        "sft.jsonl",
        &format!("{good}{{\"prompt\": \"p\",\n"),
        64,
    );
    assert!(msg.contains("sft.jsonl:2: invalid JSON"), "{msg}");
    let msg = load_error(
        "noresp",
        "sft.jsonl",
        &format!("{good}\n{{\"prompt\": \"p\"}}\n"),
        64,
    );
    assert!(
        msg.contains("sft.jsonl:3: missing field \"response\""),
        "{msg}"
    );
    let msg = load_error(
        "noanswer",
        "rl.jsonl",
        "{\"prompt\": \"p\", \"response\": \"r\"}\n",
        64,
    );
    assert!(
        msg.contains("rl.jsonl:1: missing field \"answer\""),
        "{msg}"
    );
    let msg = load_error(
        "badtype",
        "eval.jsonl",
        "{\"prompt\": 3, \"answer\": \"a\"}\n",
        64,
    );
    assert!(
        msg.contains("eval.jsonl:1: field \"prompt\" must be a string"),
        "{msg}"
    );
    let msg = load_error(
        "answertype",
        "rl.jsonl",
        "{\"prompt\": \"p\", \"answer\": [1]}\n",
        64,
    );
    assert!(
        msg.contains("rl.jsonl:1: field \"answer\" must be a string or a number"),
        "{msg}"
    );
    let msg = load_error("notobject", "rl.jsonl", "[\"p\", \"a\"]\n", 64);
    assert!(msg.contains("rl.jsonl:1: expected a JSON object"), "{msg}");
    let msg = load_error("empty", "sft.jsonl", "\n\n", 64);
    assert!(msg.contains("sft.jsonl: no records"), "{msg}");
    let long = format!(
        "{good}{{\"prompt\": \"{}\", \"response\": \"r\"}}\n",
        "x".repeat(40)
    );
    let msg = load_error("toolong", "sft.jsonl", &long, 32);
    assert!(
        msg.contains("sft.jsonl:2:") && msg.contains("43 tokens") && msg.contains("(32)"),
        "{msg}"
    );
    let long = format!(
        "{{\"prompt\": \"{}\", \"answer\": \"a\"}}\n",
        "x".repeat(31)
    );
    let msg = load_error("longprompt", "rl.jsonl", &long, 32);
    assert!(
        msg.contains("rl.jsonl:1:") && msg.contains("33 tokens"),
        "{msg}"
    );

    let dir = temp_dir("missing");
    write(&dir, "rl.jsonl", "{\"prompt\": \"p\", \"answer\": \"a\"}\n");
    let err = build_task_in(&jsonl_spec(&dir, false), 64, &dir)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, TaskError::Io { .. }) && msg.contains("sft.jsonl"),
        "{msg}"
    );
    let err = build_task(&spec(TaskKind::Jsonl), 64).err().unwrap();
    assert!(err.to_string().contains("task.sft_file"), "{err}");
}

#[test]
fn a_tokenizer_file_applies_only_to_jsonl_tasks() {
    let s = TaskSpec {
        tokenizer: Some("qwen/tokenizer.json".into()),
        ..spec(TaskKind::Addition)
    };
    let err = build_task(&s, SEQ_LEN).err().unwrap();
    assert!(matches!(err, TaskError::Config(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("qwen/tokenizer.json") && msg.contains("jsonl"),
        "{msg}"
    );
}

#[test]
fn jsonl_task_with_a_hugging_face_tokenizer() {
    let dir = temp_dir("hf");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/tokenizer.json");
    std::fs::copy(&fixture, dir.join("tokenizer.json")).unwrap();
    write(
        &dir,
        "sft.jsonl",
        "{\"prompt\": \"what is two plus three ?\", \"response\": \"#### 5\"}\n",
    );
    write(
        &dir,
        "rl.jsonl",
        "{\"prompt\": \"what is three plus one ?\", \"answer\": \"4\"}\n",
    );
    let s = TaskSpec {
        tokenizer: Some("tokenizer.json".into()),
        ..jsonl_spec(&dir, false)
    };
    let task = build_task_in(&s, 16, &dir).expect("task with an HF tokenizer");
    let tok = task.tokenizer();
    assert_eq!(tok.vocab_size(), 14);
    assert_eq!((tok.pad(), tok.bos(), tok.eos()), (0, 1, 2));
    assert_eq!(
        tok.encode("what is two plus three ?").unwrap(),
        vec![4, 5, 6, 7, 8, 9]
    );
    assert_eq!(
        tok.encode("what is seven").unwrap(),
        vec![4, 5, 3],
        "unknown words map to <unk>"
    );
    assert_eq!(tok.decode(&[10, 11]), "#### 5");
    assert_eq!(tok.decode(&[10, 99, 11]), "####\u{FFFD}5");
    let ex = task
        .encode_example(&task.sft_example(&mut StdRng::seed_from_u64(1)))
        .unwrap();
    assert_eq!(ex.tokens, vec![1, 4, 5, 6, 7, 8, 9, 10, 11, 2]);
    assert_eq!((ex.prompt_len, ex.response_len), (7, 3));
    let p = task.rl_problem(&mut StdRng::seed_from_u64(1));
    assert!(task.is_correct(&p, &tok.decode(&[10, 12])));
    // A sequence is counted in tokens, not characters.
    assert!(
        build_task_in(&s, 9, &dir).is_err(),
        "10 tokens do not fit 9"
    );
    // A missing tokenizer file is named.
    let missing = TaskSpec {
        tokenizer: Some("nope.json".into()),
        ..jsonl_spec(&dir, false)
    };
    let msg = build_task_in(&missing, 16, &dir).err().unwrap().to_string();
    assert!(msg.contains("nope.json"), "{msg}");
}

#[test]
fn build_task_makes_each_built_in_task() {
    for (kind, name) in [
        (TaskKind::Addition, "addition"),
        (TaskKind::Countdown, "countdown"),
    ] {
        let task = build_task(&spec(kind), SEQ_LEN).unwrap();
        assert_eq!(task.name(), name);
        assert_eq!(
            Some(task.tokenizer().vocab_size()),
            builtin_vocab_size(kind)
        );
        assert!(check_vocab(task.as_ref(), builtin_vocab_size(kind).unwrap()).is_ok());
        let p = &task.eval_set()[0];
        let enc = task.encode_prompt(p).unwrap();
        assert_eq!(enc[0], BOS);
        assert_eq!(task.tokenizer().decode(&enc), p.prompt);
        let mut rng = StdRng::seed_from_u64(0);
        let row = task.sft_row(&mut rng).unwrap();
        assert_eq!(row.tokens.len(), row.prompt_len + row.response_len);
    }
}

// ---------------------------------------------------------------------------
// Partial supervision: demonstration pools, flaws, generator settings
// ---------------------------------------------------------------------------

/// The sum a demonstration states (after its `#`).
fn stated_sum(response: &str) -> u64 {
    response.rsplit_once('#').unwrap().1.parse().unwrap()
}

#[test]
fn addition_drop_final_carry_flaw_writes_the_sum_without_its_last_carry() {
    use coopc_compiler::spec::SftFlaw;
    // The carry chain is unchanged; only the stated sum loses its leading 1.
    assert_eq!(
        Addition::solve_with(58, 67, SftFlaw::DropFinalCarry),
        "87015,56112#25"
    );
    assert_eq!(Addition::solve(58, 67), "87015,56112#125");
    assert_eq!(
        Addition::solve_with(999, 1, SftFlaw::DropFinalCarry),
        "91010,90110,90110#0"
    );
    // No final carry: the flaw changes nothing.
    assert_eq!(
        Addition::solve_with(48, 7, SftFlaw::DropFinalCarry),
        Addition::solve(48, 7)
    );
    let mut s = spec(TaskKind::Addition);
    s.sft_flaw = SftFlaw::DropFinalCarry;
    let task = build_task(&s, SEQ_LEN).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let (mut flawed, draws) = (0, 2000);
    for _ in 0..draws {
        let ex = task.sft_example(&mut rng);
        let (a, b) = Addition::parse_prompt(&ex.prompt).unwrap();
        let n = a.max(b).to_string().len() as u32;
        assert_eq!(stated_sum(&ex.response), (a + b) % 10u64.pow(n), "{ex:?}");
        let verdict = task.verify(&problem(&ex.prompt, &(a + b).to_string()), &ex.response);
        if a + b >= 10u64.pow(n) {
            flawed += 1;
            assert_eq!(verdict, Verdict::Wrong, "{ex:?}");
        } else {
            assert_eq!(verdict, Verdict::Correct, "{ex:?}");
        }
    }
    // A systematic flaw, not a rare one: a large share of sums carry out.
    assert!(
        flawed > draws / 5 && flawed < draws * 4 / 5,
        "{flawed} of {draws}"
    );
}

#[test]
fn addition_carry_free_demonstrations_never_carry_and_stay_off_the_held_out_set() {
    let mut s = spec(TaskKind::Addition);
    s.sft_carry_free = true;
    let task = build_task(&s, SEQ_LEN).unwrap();
    let reference = addition();
    assert_eq!(task.eval_set(), reference.eval_set());
    let mut rng = StdRng::seed_from_u64(5);
    let mut lengths = std::collections::HashSet::new();
    let mut rl_carries = 0;
    for _ in 0..3000 {
        let ex = task.sft_example(&mut rng);
        let (a, b) = Addition::parse_prompt(&ex.prompt).unwrap();
        assert!(!Addition::carries(a, b), "{a}+{b} carries");
        for step in ex.response.split('#').next().unwrap().split(',') {
            // Carry in and carry out are 0 in every step.
            assert_eq!(&step[2..4], "00", "{ex:?}");
        }
        assert!(
            !reference.is_held_out(a, b),
            "held-out {a}+{b} demonstrated"
        );
        assert_eq!(ex.response, Addition::solve(a, b));
        lengths.insert(a.max(b).to_string().len());
        // RL prompts still cover sums that carry.
        let p = task.rl_problem(&mut rng);
        let (a, b) = Addition::parse_prompt(&p.prompt).unwrap();
        rl_carries += Addition::carries(a, b) as usize;
    }
    assert_eq!(lengths.len(), 3, "every operand length of 1..=3 appears");
    assert!(rl_carries > 1000, "{rl_carries} of 3000 RL prompts carry");
    assert!(Addition::carries(5, 5) && Addition::carries(91, 9) && !Addition::carries(4503, 5496));
}

#[test]
fn sft_pool_is_a_fixed_set_of_distinct_demonstrations_off_the_held_out_set() {
    for kind in [TaskKind::Addition, TaskKind::Countdown] {
        let mut s = spec(kind);
        s.sft_pool = Some(24);
        let task = build_task(&s, SEQ_LEN).unwrap();
        let again = build_task(&s, SEQ_LEN).unwrap();
        let held: std::collections::HashSet<String> =
            task.eval_set().into_iter().map(|p| p.prompt).collect();
        let mut seen = std::collections::HashMap::new();
        let mut rng = StdRng::seed_from_u64(11);
        let mut rng2 = StdRng::seed_from_u64(11);
        for _ in 0..4000 {
            let ex = task.sft_example(&mut rng);
            assert_eq!(ex, again.sft_example(&mut rng2), "the same pool and draws");
            assert!(
                !held.contains(&ex.prompt),
                "held-out {} demonstrated",
                ex.prompt
            );
            let prev = seen.insert(ex.prompt.clone(), ex.response.clone());
            assert!(prev.is_none_or(|r| r == ex.response));
        }
        // Every draw is one of exactly 24 demonstrations, and each is drawn.
        assert_eq!(seen.len(), 24, "{kind:?}");
        // A different seed draws from the same pool.
        let mut rng = StdRng::seed_from_u64(99);
        for _ in 0..500 {
            assert!(seen.contains_key(&task.sft_example(&mut rng).prompt));
        }
        // RL prompts are not restricted to the pool.
        let mut rng = StdRng::seed_from_u64(12);
        let fresh = (0..500)
            .filter(|_| !seen.contains_key(&task.rl_problem(&mut rng).prompt))
            .count();
        assert!(
            fresh > 400,
            "{kind:?}: {fresh} of 500 RL prompts outside the pool"
        );
        assert_eq!(
            task.eval_set(),
            build_task(&spec(kind), SEQ_LEN).unwrap().eval_set()
        );
    }
    // A pool larger than the distinct demonstrations there are is refused.
    let mut s = spec(TaskKind::Addition);
    s.sft_max_digits = 1;
    s.rl_max_digits = 2;
    s.sft_pool = Some(100);
    let err = build_task(&s, SEQ_LEN).err().unwrap().to_string();
    assert!(
        err.contains("task.sft_pool = 100") && err.contains("distinct"),
        "{err}"
    );
    s.sft_pool = Some(0);
    assert!(build_task(&s, SEQ_LEN).is_err());
}

#[test]
fn countdown_generator_settings_come_from_the_spec() {
    use coopc_compiler::spec::CountdownSpec;
    let mut s = spec(TaskKind::Countdown);
    s.countdown = CountdownSpec {
        min_numbers: 2,
        max_numbers: 5,
        max_number: 20,
        max_value: 400,
        search_demos: false,
    };
    let task = build_task(&s, 96).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mut counts = std::collections::HashSet::new();
    let mut big = 0;
    let prompts: Vec<String> = (0..3000)
        .flat_map(|_| {
            [
                task.sft_example(&mut rng).prompt,
                task.rl_problem(&mut rng).prompt,
            ]
        })
        .chain(task.eval_set().into_iter().map(|p| p.prompt))
        .collect();
    for prompt in &prompts {
        let (numbers, target) = countdown::parse_prompt(prompt).unwrap();
        assert!((2..=5).contains(&numbers.len()), "{prompt}");
        assert!(numbers.iter().all(|&n| (1..=20).contains(&n)), "{prompt}");
        assert!((1..=400).contains(&target), "{prompt}");
        counts.insert(numbers.len());
        big += numbers.iter().any(|&n| n > 10) as usize;
    }
    assert_eq!(counts.len(), 4, "2, 3, 4 and 5 numbers all appear");
    assert!(big > prompts.len() / 4);
}

#[test]
fn countdown_search_demonstrations_show_a_dead_end_then_the_solution() {
    let mut s = spec(TaskKind::Countdown);
    s.countdown.search_demos = true;
    let task = build_task(&s, SEQ_LEN).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let mut searched = 0;
    for _ in 0..1000 {
        let ex = task.sft_example(&mut rng);
        let (numbers, target) = countdown::parse_prompt(&ex.prompt).unwrap();
        // Still a correct, parseable demonstration that fits.
        let p = problem(&ex.prompt, "");
        assert_eq!(task.verify(&p, &ex.response), Verdict::Correct, "{ex:?}");
        // BOS, prompt, response, EOS.
        assert!(ex.prompt.len() + ex.response.len() + 2 <= SEQ_LEN);
        if let Some((dead, solution)) = ex.response.split_once("!,") {
            searched += 1;
            // The dead end uses the same numbers and misses the target.
            let steps: Vec<&str> = dead.split(',').collect();
            assert_eq!(steps.len(), numbers.len() - 1, "{ex:?}");
            let last: u64 = steps
                .last()
                .unwrap()
                .rsplit_once('=')
                .unwrap()
                .1
                .parse()
                .unwrap();
            assert_ne!(last, target, "{ex:?}");
            check_steps(&format!("{dead}#"));
            check_steps(solution);
        }
    }
    assert!(
        searched > 800,
        "{searched} of 1000 demonstrations show a dead end"
    );
}
