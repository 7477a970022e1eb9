package main

import (
	"fmt"
	"os"
	"time"

	"github.com/shardgate/shardgate/server"
)

// userSessionFlags bound the sessions user principals create or extend
// themselves (serve and dev).
type userSessionFlags struct {
	UserSessionMaxTTL time.Duration `name:"user-session-max-ttl" help:"Longest TTL a user principal may give its own session (CreateSession, TouchSession); services and admins may give up to a year." default:"24h" env:"SHARDGATE_USER_SESSION_MAX_TTL"`
	UserSessionSchema string        `name:"user-session-schema" help:"File holding a JSON Schema that the data_json of sessions created by user principals must match (services and admins are not held to it); empty: any JSON object." env:"SHARDGATE_USER_SESSION_SCHEMA"`
}

// apply sets the server options the flags give.
func (f userSessionFlags) apply(o *server.Options) error {
	if f.UserSessionMaxTTL < time.Second || f.UserSessionMaxTTL > 365*24*time.Hour {
		return fmt.Errorf("--user-session-max-ttl %v: want 1s to 8760h", f.UserSessionMaxTTL)
	}
	o.UserSessionMaxTTL = f.UserSessionMaxTTL
	if f.UserSessionSchema != "" {
		b, err := os.ReadFile(f.UserSessionSchema)
		if err != nil {
			return fmt.Errorf("--user-session-schema: %w", err)
		}
		o.UserSessionSchema = string(b)
	}
	return nil
}
