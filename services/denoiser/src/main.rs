kd_runtime::service_main!("kd-denoiser", kd_denoiser);
