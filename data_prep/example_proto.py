"""TensorFlow's `tf.train.Example` message classes, registered with protobuf from their descriptor."""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


def _build():
    """TensorFlow's `tf.train.Example` messages (tensorflow/core/example/{example,feature}.proto: the same
    package, names, field numbers and types, so the bytes are TensorFlow's), registered with protobuf from
    their descriptor and serialised by its upb backend.

    Built here at import, in the importing thread, rather than imported from a package that ships them:
    loader threads then never import anything while they decode, and no TensorFlow or TFDS is loaded."""

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="echoclip_jax/tf_example.proto", package="tensorflow", syntax="proto3"
    )

    def message(name, *fields, nested=()):
        m = proto.message_type.add(name=name)
        for entry in nested:
            m.nested_type.add().CopyFrom(entry)
        for field_name, number, kind, label, type_name, *oneof in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
        return m

    repeated, optional = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, repeated, ""))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, repeated, ""))
    message("Int64List", ("value", 1, F.TYPE_INT64, repeated, ""))
    feature = message(
        "Feature",
        ("bytes_list", 1, F.TYPE_MESSAGE, optional, ".tensorflow.BytesList", 0),
        ("float_list", 2, F.TYPE_MESSAGE, optional, ".tensorflow.FloatList", 0),
        ("int64_list", 3, F.TYPE_MESSAGE, optional, ".tensorflow.Int64List", 0),
    )
    feature.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=optional, type_name=".tensorflow.Feature")
    message("Features", ("feature", 1, F.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry"), nested=[entry])
    message("Example", ("features", 1, F.TYPE_MESSAGE, optional, ".tensorflow.Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build()
