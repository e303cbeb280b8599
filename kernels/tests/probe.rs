use coopc_kernels::elementwise::elementwise_program;
use cubecl::prelude::*;

#[test]
fn probe_wgpu() {
    type R = cubecl::wgpu::WgpuRuntime;
    let client = R::client(&Default::default());
    let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.01).collect();
    let xh = client.create_from_slice(f32::as_bytes(&x));
    let oh = client.empty(100 * 4);
    let mut ins = SequenceArg::<R, Array<f32>>::new();
    ins.push(unsafe { ArrayArg::from_raw_parts(xh, 100) });
    let mut outs = SequenceArg::<R, Array<f32>>::new();
    outs.push(unsafe { ArrayArg::from_raw_parts(oh.clone(), 100) });
    elementwise_program::launch::<R>(
        &client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(128),
        ins,
        outs,
        100,
        2,
    );
    let b = client.read_one(oh).unwrap();
    let got = f32::from_bytes(&b);
    println!("{} {}", got[50], (0.5f32.exp()).exp());
    assert!((got[50] - 0.5f32.exp().exp()).abs() < 1e-4);
}
