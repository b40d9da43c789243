/// Files another module derives from layers and keeps in the store (the VM backend's erofs
/// images): `collectGarbage` removes those whose layer is gone.
public protocol DerivedLayerFiles: Sendable {
    /// Their directory, relative to the store's root (`vm/erofs`).
    var directory: String { get }
    /// The hex digest of the layer a file was derived from; nil for a name that is not one.
    func layer(ofFile name: String) -> String?
}
