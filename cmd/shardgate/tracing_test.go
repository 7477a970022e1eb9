package main

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
)

// Tracing is off unless an OTLP endpoint is set, and says what it cannot use.
func TestTracingFromEnv(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	cases := []struct {
		name    string
		env     map[string]string
		on      bool
		errText string
	}{
		{"nothing set", nil, false, ""},
		{"sampler alone", map[string]string{"OTEL_TRACES_SAMPLER": "traceidratio"}, false, ""},
		{"endpoint", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, true, ""},
		{"traces endpoint, grpc", map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, true, ""},
		{"disabled", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, false, ""},
		{"exporter none", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, false, ""},
		{"exporter zipkin", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "zipkin"}, false, "only otlp"},
		{"bad protocol", map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, false, "want grpc or http/protobuf"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for k, v := range c.env {
				t.Setenv(k, v) // the exporters read their own variables too
			}
			tp, shutdown, err := tracingFromEnv(context.Background(), func(k string) string { return c.env[k] }, log)
			if c.errText != "" {
				if err == nil || !strings.Contains(err.Error(), c.errText) {
					t.Fatalf("err %v, want one saying %q", err, c.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (tp != nil) != c.on {
				t.Fatalf("tracing on = %v, want %v", tp != nil, c.on)
			}
			if err := shutdown(context.Background()); err != nil {
				t.Fatal(err)
			}
		})
	}
}
