fn main() {
    kd_runtime::launch::main(
        "kd-text-encoder",
        |c: &kd_text_encoder::Config| &c.common,
        kd_text_encoder::run_with_listeners,
    )
}
