kd_runtime::service_main!("kd-text-encoder", kd_text_encoder);
