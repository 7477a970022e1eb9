package server

import (
	"context"
	"encoding/base64"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/shardgate/shardgate/events"
	"github.com/shardgate/shardgate/mover"
	"github.com/shardgate/shardgate/router"
)

// Declarative request validation: one table of field rules per request
// message, checked by an interceptor before any handler runs. It is the
// only check of each field; handlers check only what a rule of one field
// cannot express (how fields combine, state). (protovalidate would express
// the same in the .proto files, but its validate.proto comes from the Buf
// Schema Registry, which the build cannot reach.)

// ruleKind is what a field must be.
type ruleKind int

const (
	ruleUserID        ruleKind = iota // 1-128 bytes of [A-Za-z0-9._:@-]
	ruleName                          // collection or namespace
	ruleKey                           // item or config key
	rulePrefix                        // a key, or empty
	ruleJSONObject                    // a JSON object (empty reads as {}), at most MaxJSONBytes
	ruleJSONValue                     // any JSON value, at most MaxJSONBytes
	ruleJSONOptional                  // empty, or any JSON value
	ruleTTL                           // 1 s - 1 year
	ruleExpected                      // absent or ≥ 0
	rulePageSize                      // 0 (default) or 1-1000
	rulePageToken                     // from a previous ListItems/ListConfig
	ruleSessionPage                   // from a previous ListSessions
	ruleSessionToken                  // "<partition>.<random>"
	rulePartition                     // 0 ≤ p < partition count
	ruleUserIDList                    // up to maxWatchUsers valid user IDs
	rulePartitionList                 // partitions < partition count, at most one per partition
	ruleCursor                        // up to maxCursor bytes of printable ASCII
	ruleMaxParallel                   // 0 (default) or 1-64
	ruleShardName                     // 1-63 bytes of [a-z0-9_-], starting with a letter or digit
	ruleDSN                           // a non-empty DSN, at most maxDSN bytes, no control characters
	ruleWeight                        // 0 (default 1) or 1-64
	ruleFreezeBudget                  // 0 (default) or 1-1000 ms
	ruleBacklogAge                    // 0 (default) or 1-86400 s
)

// maxBacklogAgeSeconds bounds GetClusterStatus's backlog threshold: a day.
const maxBacklogAgeSeconds = 86400

// maxDSN bounds a shard DSN.
const maxDSN = 4096

// maxCursor is the longest Watch cursor: one position per followed stream,
// so a watch of every partition has a long one (events.ParseCursor checks
// the rest).
var maxCursor = base64.RawURLEncoding.EncodedLen(events.MaxCursorBytes)

type fieldRule struct {
	field string
	kind  ruleKind
}

// requestRules lists, per request message, the rules of its fields. Every
// request message of DataService and AdminService has an entry (a test
// checks), so a new RPC cannot skip validation by accident. Messages of
var requestRules = map[protoreflect.FullName][]fieldRule{
	"shardgate.v1.PutUserRequest":       {{"user_id", ruleUserID}, {"profile_json", ruleJSONObject}, {"expected_version", ruleExpected}},
	"shardgate.v1.GetUserRequest":       {{"user_id", ruleUserID}},
	"shardgate.v1.DeleteUserRequest":    {{"user_id", ruleUserID}, {"expected_version", ruleExpected}},
	"shardgate.v1.CreateSessionRequest": {{"user_id", ruleUserID}, {"data_json", ruleJSONObject}, {"ttl_seconds", ruleTTL}},
	"shardgate.v1.GetSessionRequest":    {{"token", ruleSessionToken}},
	"shardgate.v1.TouchSessionRequest":  {{"token", ruleSessionToken}, {"ttl_seconds", ruleTTL}},
	"shardgate.v1.RevokeSessionRequest": {{"token", ruleSessionToken}},
	"shardgate.v1.ListSessionsRequest":  {{"user_id", ruleUserID}, {"page_size", rulePageSize}, {"page_token", ruleSessionPage}},
	"shardgate.v1.PutItemRequest": {{"user_id", ruleUserID}, {"collection", ruleName}, {"key", ruleKey},
		{"value_json", ruleJSONValue}, {"expected_version", ruleExpected}},
	"shardgate.v1.GetItemRequest":    {{"user_id", ruleUserID}, {"collection", ruleName}, {"key", ruleKey}},
	"shardgate.v1.DeleteItemRequest": {{"user_id", ruleUserID}, {"collection", ruleName}, {"key", ruleKey}, {"expected_version", ruleExpected}},
	"shardgate.v1.ListItemsRequest": {{"user_id", ruleUserID}, {"collection", ruleName}, {"prefix", rulePrefix},
		{"page_size", rulePageSize}, {"page_token", rulePageToken}},
	"shardgate.v1.GetConfigRequest":        {{"namespace", ruleName}, {"key", ruleKey}},
	"shardgate.v1.SetConfigRequest":        {{"namespace", ruleName}, {"key", ruleKey}, {"value_json", ruleJSONValue}, {"expected_version", ruleExpected}},
	"shardgate.v1.DeleteConfigRequest":     {{"namespace", ruleName}, {"key", ruleKey}, {"expected_version", ruleExpected}},
	"shardgate.v1.ListConfigRequest":       {{"namespace", ruleName}, {"page_size", rulePageSize}, {"page_token", rulePageToken}},
	"shardgate.v1.WatchRequest":            {{"user_ids", ruleUserIDList}, {"partitions", rulePartitionList}, {"cursor", ruleCursor}},
	"shardgate.v1.GetTopologyRequest":      {},
	"shardgate.v1.LocateUserRequest":       {{"user_id", ruleUserID}},
	"shardgate.v1.MigrationStatusRequest":  {},
	"shardgate.v1.SetConfigSchemaRequest":  {{"namespace", ruleName}, {"schema_json", ruleJSONOptional}},
	"shardgate.v1.GetConfigSchemaRequest":  {{"namespace", ruleName}},
	"shardgate.v1.AddShardRequest":         {{"name", ruleShardName}, {"dsn", ruleDSN}, {"weight", ruleWeight}},
	"shardgate.v1.DrainShardRequest":       {{"name", ruleShardName}},
	"shardgate.v1.ActivateShardRequest":    {{"name", ruleShardName}},
	"shardgate.v1.RemoveShardRequest":      {{"name", ruleShardName}},
	"shardgate.v1.PlanRebalanceRequest":    {{"max_parallel", ruleMaxParallel}},
	"shardgate.v1.StartRebalanceRequest":   {{"max_parallel", ruleMaxParallel}, {"freeze_budget_ms", ruleFreezeBudget}},
	"shardgate.v1.GetRebalanceRequest":     {},
	"shardgate.v1.WatchRebalanceRequest":   {},
	"shardgate.v1.CancelRebalanceRequest":  {},
	"shardgate.v1.VerifyPartitionRequest":  {{"partition", rulePartition}},
	"shardgate.v1.GetClusterStatusRequest": {{"max_backlog_age_seconds", ruleBacklogAge}},
	"shardgate.v1.ExportDataRequest":       {{"partitions", rulePartitionList}},
}

type compiledRule struct {
	fd   protoreflect.FieldDescriptor
	kind ruleKind
}

// validator applies requestRules.
type validator struct {
	maxJSON    int
	partitions func() int
	compiled   sync.Map // protoreflect.FullName → []compiledRule
}

// rules returns the compiled rules of a message type. A rule naming a
// field the message lacks is a programming error and panics (a test
// compiles every entry).
func (v *validator) rules(md protoreflect.MessageDescriptor) ([]compiledRule, bool) {
	if r, ok := v.compiled.Load(md.FullName()); ok {
		return r.([]compiledRule), true
	}
	table, ok := requestRules[md.FullName()]
	if !ok {
		return nil, false
	}
	out := make([]compiledRule, len(table))
	for i, r := range table {
		fd := md.Fields().ByName(protoreflect.Name(r.field))
		if fd == nil {
			panic(fmt.Sprintf("requestRules: %s has no field %s", md.FullName(), r.field))
		}
		out[i] = compiledRule{fd: fd, kind: r.kind}
	}
	v.compiled.Store(md.FullName(), out)
	return out, true
}

// check validates one request message.
func (v *validator) check(m proto.Message) error {
	msg := m.ProtoReflect()
	rules, ok := v.rules(msg.Descriptor())
	if !ok {
		return nil // not a request of ours (health, reflection)
	}
	for _, r := range rules {
		if err := v.checkField(msg, r); err != nil {
			return err
		}
	}
	return nil
}

func (v *validator) checkField(msg protoreflect.Message, r compiledRule) error {
	name := string(r.fd.Name())
	val := msg.Get(r.fd)
	switch r.kind {
	case ruleUserID:
		return validateUserID(name, val.String())
	case ruleName:
		return validateName(name, val.String())
	case ruleKey:
		return validateKey(name, val.String(), false)
	case rulePrefix:
		return validateKey(name, val.String(), true)
	case ruleJSONObject:
		return validateJSON(name, val.String(), true, v.maxJSON)
	case ruleJSONValue:
		return validateJSON(name, val.String(), false, v.maxJSON)
	case ruleJSONOptional:
		if val.String() == "" {
			return nil
		}
		return validateJSON(name, val.String(), false, v.maxJSON)
	case ruleTTL:
		return validateTTL(name, val.Int())
	case ruleExpected:
		if msg.Has(r.fd) && val.Int() < 0 {
			return invalid(name, "%d is negative", val.Int())
		}
	case rulePageSize:
		return validatePageSize(name, int32(val.Int()))
	case rulePageToken:
		_, err := decodePageToken(name, val.String())
		return err
	case ruleSessionPage:
		_, err := decodeSessionPageToken(name, val.String())
		return err
	case ruleSessionToken:
		_, err := parseToken(name, val.String(), v.partitions())
		return err
	case rulePartition:
		if p := val.Int(); p < 0 || p >= int64(v.partitions()) {
			return invalid(name, "%d is outside 0..%d", p, v.partitions()-1)
		}
	case ruleUserIDList:
		l := val.List()
		if l.Len() > maxWatchUsers {
			return invalid(name, "%d entries exceed the limit of %d", l.Len(), maxWatchUsers)
		}
		for i := range l.Len() {
			if err := validateUserID(fmt.Sprintf("%s[%d]", name, i), l.Get(i).String()); err != nil {
				return err
			}
		}
	case rulePartitionList:
		l := val.List()
		n := uint64(v.partitions())
		if uint64(l.Len()) > n {
			return invalid(name, "%d entries exceed the partition count %d", l.Len(), n)
		}
		for i := range l.Len() {
			if p := l.Get(i).Uint(); p >= n {
				return invalid(fmt.Sprintf("%s[%d]", name, i), "%d is outside 0..%d", p, n-1)
			}
		}
	case ruleCursor:
		s := val.String()
		if len(s) > maxCursor {
			return invalid(name, "%d bytes exceeds the limit of %d", len(s), maxCursor)
		}
		for i := 0; i < len(s); i++ {
			if s[i] < '!' || s[i] > '~' {
				return invalid(name, "byte %d is not printable ASCII", i)
			}
		}
	case ruleMaxParallel:
		if n := val.Int(); n < 0 || n > 64 {
			return invalid(name, "%d is outside 1..64", n)
		}
	case ruleShardName:
		if err := router.ValidateShardName(val.String()); err != nil {
			return invalid(name, "%v", err)
		}
	case ruleDSN:
		d := val.String()
		switch {
		case d == "":
			return invalid(name, "is required")
		case len(d) > maxDSN:
			return invalid(name, "%d bytes exceeds the limit of %d", len(d), maxDSN)
		}
		for i := 0; i < len(d); i++ {
			if d[i] < ' ' || d[i] == 0x7f {
				return invalid(name, "byte %d is a control character", i)
			}
		}
	case ruleWeight:
		if n := val.Int(); n < 0 || n > router.MaxWeight {
			return invalid(name, "%d is outside 1..%d", n, router.MaxWeight)
		}
	case ruleFreezeBudget:
		if n := val.Int(); n < 0 || n > mover.MaxFreezeBudget.Milliseconds() {
			return invalid(name, "%d is outside 1..%d", n, mover.MaxFreezeBudget.Milliseconds())
		}
	case ruleBacklogAge:
		if n := val.Int(); n < 0 || n > maxBacklogAgeSeconds {
			return invalid(name, "%d is outside 1..%d (seconds)", n, maxBacklogAgeSeconds)
		}
	}
	return nil
}

// validateUnary checks each request before its handler runs.
func validateUnary(v *validator) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if m, ok := req.(proto.Message); ok {
			if err := v.check(m); err != nil {
				return nil, err
			}
		}
		return h(ctx, req)
	}
}

// validateStream checks every message a stream receives.
func validateStream(v *validator) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, &validatedStream{ServerStream: ss, v: v})
	}
}

type validatedStream struct {
	grpc.ServerStream
	v *validator
}

func (s *validatedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if pm, ok := m.(proto.Message); ok {
		if err := s.v.check(pm); err != nil {
			return toStatus(s.Context(), nil, "", err)
		}
	}
	return nil
}
