package main

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"strings"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// tracingFromEnv sets up OpenTelemetry tracing from the standard OTEL_*
// variables. Tracing is off (nil provider, nothing runs) unless an OTLP
// endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), and off whatever else is set with
// OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. The exporter reads
// its own variables (headers, TLS, timeout; protocol: grpc or the default
// http/protobuf), the sampler OTEL_TRACES_SAMPLER(_ARG) (default: every
// trace, or the caller's decision), the resource OTEL_SERVICE_NAME and
// OTEL_RESOURCE_ATTRIBUTES (service.name defaults to "shardgate").
// shutdown flushes what is buffered.
func tracingFromEnv(ctx context.Context, getenv func(string) string, log *slog.Logger) (tp trace.TracerProvider, shutdown func(context.Context) error, err error) {
	off := func(context.Context) error { return nil }
	endpoint := getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	if endpoint == "" {
		endpoint = getenv("OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	exporterKind := strings.TrimSpace(getenv("OTEL_TRACES_EXPORTER"))
	switch {
	case strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true"), exporterKind == "none", endpoint == "":
		return nil, off, nil
	case exporterKind != "" && exporterKind != "otlp":
		return nil, nil, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: only otlp (or none) is supported", exporterKind)
	}
	protocol := getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	var exp *otlptrace.Exporter
	switch protocol {
	case "", "http/protobuf":
		exp, err = otlptracehttp.New(ctx)
	case "grpc":
		exp, err = otlptracegrpc.New(ctx)
	default:
		return nil, nil, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL=%q: want grpc or http/protobuf", protocol)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("OTLP trace exporter: %w", err)
	}
	// Later sources win: the environment's service name over the default.
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "shardgate")),
		resource.WithTelemetrySDK(), resource.WithHost(), resource.WithFromEnv())
	if err != nil {
		log.Warn("tracing resource incomplete", "err", err)
	}
	p := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	log.Info("tracing on (OTLP)", "protocol", cmp.Or(protocol, "http/protobuf"), "sampler", cmp.Or(getenv("OTEL_TRACES_SAMPLER"), "parentbased_always_on"))
	return p, p.Shutdown, nil
}
