package xdsclient

import (
	"fmt"

	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

type anyMsg = anypb.Any

// noUnknown fails on the first message (m or any message inside it) that carries fields its
// proto definition does not have: meshid must send only what Envoy's API defines.
func noUnknown(m protoreflect.Message) error {
	if u := m.GetUnknown(); len(u) > 0 {
		return fmt.Errorf("%s carries %d bytes of fields unknown to Envoy's protos", m.Descriptor().FullName(), len(u))
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = noUnknown(l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				err = noUnknown(mv.Message())
				return err == nil
			})
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil:
			err = noUnknown(v.Message())
		}
		return err == nil
	})
	return err
}
